"""The time-skipping test server, with paysaga's search attributes registered.

That server implements no ListSearchAttributes (so
infra.temporal_client.register_search_attributes cannot run there) but does accept
AddSearchAttributes: register ours, and the workflow's search attributes work unchanged.
Workers there run regular activities (`local_activities=False`): the server skips time while a
local activity runs inside a workflow task, which replays as a different timer order (the real
server does not do this; tests/workflows/test_replay.py covers local-activity histories)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from infra.embedded import temporal as temporal_server
from workflows import search_attributes as sa


@asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=temporal_server.test_server_binary(),
        data_converter=pydantic_data_converter,
    )
    async with env:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
                    for key in sa.ALL_KEYS
                },
            )
        )
        yield env
