"""Rules that validate a value and state themselves in the OpenAPI document, from one object.

A generated client trusts the document: every bound the API enforces must be in it, and the
bound it reads must be the one that is enforced. Pydantic's own constraints (`max_length`,
`pattern`, `ge`…) are both already; these markers are for the rules whose refusal has a code
of its own (`amount_too_small`, `currency_unsupported`, `metadata_too_large`), so that code
survives while the schema still comes from the very values the check uses.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import BeforeValidator, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

# Past this a float no longer spells every integer exactly.
_EXACT_FLOAT_INTEGERS = 2**53


def _whole_number(value: Any) -> Any:
    """JSON Schema's `integer` admits `2500.0`, the same number as `2500`, so a client (or a
    JSON library) that writes it so is understood; `2500.5`, `"2500"` and `true` are still
    refused (strict models)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_FLOAT_INTEGERS:
        return int(value)
    return value


# For every integer a client sends in a JSON body.
JsonInteger = BeforeValidator(_whole_number)


class _Checked:
    """A rule checked after the type's own validation (`_check`) and stated in the schema the
    type already has (`_describe`): each marker below says only its check and its bound."""

    def _check(self, value: Any) -> Any:
        raise NotImplementedError

    def _describe(self, described: JsonSchemaValue) -> None:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: Any, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        described = handler(schema)
        self._describe(described)
        return described


@dataclass(frozen=True)
class MinorUnits(_Checked):
    """An integer amount within [minimum, maximum]; below it `too_small`, above it `too_large`."""

    minimum: int
    maximum: int
    too_small: str
    too_large: str
    message: str = "Amount must be a positive integer."

    def _check(self, value: int) -> int:
        if value < self.minimum:
            raise PydanticCustomError(self.too_small, self.message)
        if value > self.maximum:
            raise PydanticCustomError(
                self.too_large, "Amount exceeds the largest amount accepted.", {"max": self.maximum}
            )
        return value

    def _describe(self, described: JsonSchemaValue) -> None:
        described.update(minimum=self.minimum, maximum=self.maximum)


@dataclass(frozen=True)
class OneOf(_Checked):
    """A string among `values` (listed as the schema's `enum`); otherwise refused as `code`."""

    values: Collection[str]
    code: str
    message: str

    def _check(self, value: str) -> str:
        if value not in self.values:
            raise PydanticCustomError(self.code, self.message)
        return value

    def _describe(self, described: JsonSchemaValue) -> None:
        described["enum"] = sorted(self.values)


@dataclass(frozen=True)
class MaxKeys(_Checked):
    """An object with at most `limit` keys (the schema's `maxProperties`); else `code`."""

    limit: int
    code: str

    def _check(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > self.limit:
            raise PydanticCustomError(self.code, "At most {n} keys.", {"n": self.limit})
        return value

    def _describe(self, described: JsonSchemaValue) -> None:
        described["maxProperties"] = self.limit
        # Pydantic states a key pattern as `patternProperties`, which lets keys of any other
        # form through; what is enforced is that every key matches: `propertyNames`.
        patterns = described.pop("patternProperties", None)
        if isinstance(patterns, dict) and len(patterns) == 1:
            ((pattern, values),) = patterns.items()
            described["propertyNames"] = {**described.get("propertyNames", {}), "pattern": pattern}
            described["additionalProperties"] = values
        elif patterns is not None:
            described["patternProperties"] = patterns
