"""The worker's HTTP views: health, metrics, intake, recommendations and the alert pages."""
