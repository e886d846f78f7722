"""What both worker pools share: the worker skeleton (:mod:`worker_base.worker`: the loop
thread, the request-plane drain, the step-failure cleanup, the socket shutdown) and the Ray
shell (:mod:`worker_base.actor`). Nothing here imports either pool or the router."""
