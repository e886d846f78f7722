"""What both worker pools share: the Ray shell (:mod:`worker_base.actor`). Nothing here
imports either pool or the router."""
