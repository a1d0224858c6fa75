"""The ``kestrel`` command line: argument parsing and the demo/bench drivers; the work lives in the layers."""
