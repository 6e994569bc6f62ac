"""A catalog: one named record per concept, and the pydantic type that validates its names.

Every place that offers a choice (CLI ``choices``, API fields and their OpenAPI ``enum``,
validation messages) derives it from a :class:`Catalog`, so a new dataset, architecture,
attack or job kind is one :meth:`Catalog.register` call away from being offered everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema


class Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def title(self) -> str: ...


EntryT = TypeVar("EntryT", bound=Named)


class UnknownNameError(ValueError):
    """A name that no entry of the catalog has; the message lists the valid names."""


class Catalog(Generic[EntryT]):
    """Records of one concept by name, in registration order.

    ``concept`` is the singular noun used in messages ("attack", "dataset").
    """

    def __init__(self, concept: str, entries: Iterable[EntryT] = ()) -> None:
        self.concept = concept
        self._entries: dict[str, EntryT] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: EntryT, *, replace: bool = False) -> EntryT:
        """Add ``entry``; a second entry of the same name is an error unless ``replace``."""
        if entry.name in self._entries and not replace:
            raise ValueError(f"{self.concept} {entry.name!r} is already in the catalog")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> EntryT:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        return f"unknown {self.concept} {name!r}; valid {self.concept}s: {', '.join(self)}"

    def check(self, name: str) -> str:
        """``name`` itself if the catalog has it (a pydantic after-validator)."""
        self.get(name)
        return name

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[EntryT, ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class OneOf:
    """Pydantic metadata: a ``str`` that must name an entry of ``catalog``.

    ``Annotated[str, OneOf(ATTACKS)]`` validates against the catalog as it is at validation
    time and shows the names as the JSON schema's ``enum`` (so OpenAPI lists them).
    """

    catalog: Catalog[Any]

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.catalog.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["enum"] = list(self.catalog.names())
        return json_schema

    def __hash__(self) -> int:
        return id(self.catalog)
