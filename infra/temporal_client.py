"""One way to connect to Temporal: pydantic payloads (encrypted when keys are configured)."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter

from settings import Settings


def data_converter(settings: Settings) -> DataConverter:
    converter = pydantic_data_converter
    if settings.encryption_keys:
        from infra.codec import EncryptionCodec

        converter = dataclasses.replace(
            converter, payload_codec=EncryptionCodec.from_settings(settings)
        )
    return converter


async def connect_client(settings: Settings) -> Client:
    if not settings.temporal_address:
        raise RuntimeError("PAYSAGA_TEMPORAL_ADDRESS is not set")
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
    )
