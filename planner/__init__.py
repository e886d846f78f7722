"""Sizing a deployment before running it: `pdserve profile` measures an engine's cost model
on the machine at hand (profiler.py, written in the format of profile_format.py, fitted by
costmodel.py); `pdserve plan` simulates clusters on a workload with it. Imports the engine
only to profile it; never ray or grpc, and the engine never imports this package."""
