"""Everything behind the HTTP API, one subpackage per process.

engine/  the engine core (LLM, AsyncLLMEngine, scheduler, model...): no Ray, FastAPI or Triton.
replica/ the model-replica Serve deployment that runs an engine (replica processes).
router/  the ingress process's Ray half: replica client, request router, routing policy.
tracker/ the scheduler actor (LoadTracker) replicas report load to and routers read.
"""
