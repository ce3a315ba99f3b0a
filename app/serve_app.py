"""The Serve application: the OpenAI API ingress in front of autoscaled model replicas.

`serve run deploy/config.yaml` imports `build_app` with the config's `args:`; the graph is
ingress -> ModelReplica, and the ingress's handle routes with PagodaRequestRouter.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from app.serve_args import PagodaArgs
from app.settings import Settings
from workers.replica.deployment import ModelReplica
from workers.router.replica_client import ReplicaClient
from workers.router.request_router import PagodaRequestRouter


@serve.deployment(name="PagodaIngress")
@serve.ingress()
class PagodaIngress:
    """Tokenizes, applies the chat template and streams SSE; generation runs on replicas."""

    def __init__(self, replica: DeploymentHandle, args: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        parsed = PagodaArgs.model_validate(args)
        tokenizer = AutoTokenizer.from_pretrained(parsed.engine.model)
        self.client = ReplicaClient(replica, parsed.engine, tokenizer,
                                    max_choices=parsed.replicas.max_choices(),
                                    max_resumes=parsed.replicas.max_resumes)
        self.settings = Settings.of(parsed.api)

    def __serve_build_asgi_app__(self) -> Any:
        from app.api import build_app as build_api
        from workers.store.response_store import ActorStore

        store = ActorStore(self.settings.response_store_records,
                           self.settings.response_store_mb * 2**20)
        return build_api(self.client, self.settings, store)


def build_app(args: PagodaArgs | dict[str, Any]) -> Application:
    """Serve application builder (`import_path: app.serve_app:build_app`)."""
    args = args if isinstance(args, PagodaArgs) else PagodaArgs.model_validate(args or {})
    router = RequestRouterConfig(request_router_class=PagodaRequestRouter,
                                 request_router_kwargs=args.router_kwargs())
    replica = ModelReplica.options(
        **args.replica_options(), request_router_config=router,
    ).bind(args.engine, args.replicas.report_interval_s)
    return PagodaIngress.options(**args.ingress.deployment_options()).bind(
        replica, args.model_dump(mode="json"))
