"""What crosses process boundaries, in one neutral place that the router and both worker
pools import (and that imports none of them, nor the engine's model code):

  messages        the router <-> worker planes' message formats (ZeroMQ + msgpack)
  sockets         the ZeroMQ socket helpers both workers use
  sampling_params SamplingParams, the request parameters (re-exported by the engine)
  errors          InvalidRequestError (re-exported by the engine)
  prefix_hash     the chained prefix-block hash the router's index and the engine's cache share

The KV plane's wire format is kv_transfer/wire.py. See docs/ARCHITECTURE.md.
"""
