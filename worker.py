"""The worker's entry point, as the design names it: ``python worker.py`` runs what
``uws worker`` runs (``app.worker``, where the worker is built)."""

from app.worker import main

if __name__ == "__main__":
    main()
