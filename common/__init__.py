"""What the API and the workers share, torch-free: settings, ORM models, job specs, task and
queue names, the Celery app factory and the artifact store."""
