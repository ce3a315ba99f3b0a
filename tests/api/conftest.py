"""One real engine for every API test, served by uvicorn on a free local port."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from live_server import MAX_MODEL_LEN, NUM_KV_BLOCKS, serve


@pytest.fixture(scope="session")
def engine(model_dir):
    from workers.engine.async_engine import AsyncLLMEngine
    from workers.engine.config import EngineConfig

    eng = AsyncLLMEngine(EngineConfig(model=model_dir, max_model_len=MAX_MODEL_LEN,
                                      num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=8))
    yield eng
    asyncio.run(eng.shutdown(drain=False))


@pytest.fixture(scope="session")
def server(engine):
    live = serve(engine)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def model_name(engine) -> str:
    return engine.config.model_name


@pytest.fixture(scope="module")
def thinking(engine):
    """A server with the reasoning parser on."""
    live = serve(engine, reasoning_parser="think")
    with httpx.Client(base_url=live.url, timeout=120) as http:
        yield http
    live.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
