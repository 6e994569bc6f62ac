"""Celery workers: the only place that joins the core to the database and the artifact store.

Start one with ``bulwark worker`` (one process per GPU). Tasks import torch and the core
inside their bodies, so the parent process that forks them never initializes CUDA.
"""
