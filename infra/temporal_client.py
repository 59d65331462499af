"""One way to connect to Temporal: pydantic payloads (encrypted when keys are configured),
traced when an OTLP endpoint is configured."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime

from infra.observability import client_interceptors
from settings import Settings


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
