"""The Bulwark HTTP API (FastAPI). It never imports torch: it validates a spec, writes a row,
enqueues a task by name and answers. ``api.app.create_app`` builds the application."""
