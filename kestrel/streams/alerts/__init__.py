"""The analysts' alert desk: pure case rules (``cases``) and their Redis store (``store``)."""
