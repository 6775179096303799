"""Running the pipeline as services: `python -m deploy.services start|stop|status`."""
