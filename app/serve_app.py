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

    def __init__(self, replica: DeploymentHandle, args: PagodaArgs) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.engine.model)
        self.client = ReplicaClient(replica, args.engine, tokenizer,
                                    max_choices=args.replicas.max_choices(),
                                    max_resumes=args.replicas.max_resumes)
        self.settings = Settings.of(args.api)  # the environment of the ingress's node

    def __serve_build_asgi_app__(self) -> Any:
        from app.api import build_app as build_api
        from workers.store.response_store import ActorStore

        store = ActorStore(self.settings.response_store_records,
                           self.settings.response_store_mb * 2**20)
        return build_api(self.client, self.settings, store)


def build_app(args: PagodaArgs | dict[str, Any]) -> Application:
    """Serve application builder (`import_path: app.serve_app:build_app`)."""
    args = args if isinstance(args, PagodaArgs) else PagodaArgs.model_validate(args or {})
    # Ray annotates every keyword of RequestRouterConfig as a dict; mypy does not see that
    # @serve.deployment turns a class into a Deployment, which has `options`
    router = RequestRouterConfig(
        request_router_class=PagodaRequestRouter,  # type: ignore[arg-type]
        request_router_kwargs=args.router_kwargs())
    replica = ModelReplica.options(  # type: ignore[attr-defined]
        **args.replica_options(), request_router_config=router,
    ).bind(args.engine, args.replicas.report_interval_s)
    ingress = PagodaIngress.options(**args.ingress.deployment_options())  # type: ignore[attr-defined]
    return ingress.bind(replica, args)
