"""One way to connect to Temporal: pydantic payloads (encrypted when keys are configured),
traced when an OTLP endpoint is configured; and the namespace's setup (search attributes)."""

from __future__ import annotations

import asyncio
import dataclasses

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime

from infra.errors import StackError
from infra.observability import client_interceptors
from settings import Settings
from workflows.search_attributes import ALL_KEYS


def data_converter(settings: Settings) -> DataConverter:
    converter = pydantic_data_converter
    if settings.encryption_keys:
        from infra.codec import EncryptionCodec

        # Failure messages can quote a CRM's answer: encode them too, not only payloads.
        converter = dataclasses.replace(
            converter,
            payload_codec=EncryptionCodec.from_settings(settings),
            failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
        )
    return converter


async def connect_client(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """`runtime`: e.g. `infra.observability.temporal_runtime` to serve the SDK's metrics.
    The tracing interceptor set here also applies to workers built from this client."""
    if not settings.temporal_address:
        raise RuntimeError("PAYSAGA_TEMPORAL_ADDRESS is not set")
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
        interceptors=client_interceptors(settings),
        runtime=runtime,
    )


async def connect_when_ready(address: str, namespace: str, timeout: float = 60.0) -> Client:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            client = await Client.connect(address, namespace=namespace)
            await client.service_client.check_health()
            return client
        except Exception as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise StackError(f"Temporal at {address} does not answer: {exc}") from exc
            await asyncio.sleep(0.2)


async def register_search_attributes(client: Client) -> None:
    """Idempotent: adds only the attributes the namespace does not have yet (a reused SQLite
    file or an external cluster may predate some of them)."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    missing = {
        key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
        for key in ALL_KEYS
        if key.name not in existing.custom_attributes
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
