"""Candidate explanations: catalogs per product line, plus free text per request."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.common import read_yaml
from models.errors import ConfigError
from models.preprocess import check_explanation

CATALOG_DIR = Path(__file__).resolve().parent / "catalogs"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    facts: dict
    texts: tuple[str, ...]       # texts[0] is what the operator sees
    heldout: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        return self.texts[0]


@dataclass(frozen=True)
class Catalog:
    line: str
    description: str
    entries: tuple[CatalogEntry, ...]

    @property
    def displays(self) -> list[str]:
        return [e.display for e in self.entries]

    @property
    def defective(self) -> list[bool | None]:
        """Per entry: whether it names a defect (facts.defective), None where the fact is absent."""
        return [None if e.facts.get("defective") is None else bool(e.facts["defective"]) for e in self.entries]


def load_catalog(path: str | Path) -> Catalog:
    data = read_yaml(path, "catalog", f"list the files in {CATALOG_DIR}")
    try:
        entries = tuple(_entry(e) for e in data["entries"])
        catalog = Catalog(str(data["line"]), str(data.get("description", "")), entries)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"catalog {path} is malformed ({exc}); each entry needs id, facts "
                          f"and a non-empty list of texts") from None
    if len({e.id for e in entries}) != len(entries) or not entries:
        raise ConfigError(f"catalog {path} needs at least one entry and unique entry ids")
    return catalog


def _entry(data: dict) -> CatalogEntry:
    texts = tuple(check_explanation(t) for t in data["texts"])
    if not texts:
        raise ValueError(f"entry {data.get('id')} has no texts")
    heldout = tuple(check_explanation(t) for t in data.get("heldout", ()))
    return CatalogEntry(str(data["id"]), dict(data.get("facts", {})), texts, heldout)


def merge_candidates(catalog_texts: list[str], extra: list[str] | None) -> list[str]:
    """Catalog texts followed by request-supplied ones, duplicates dropped, order kept."""
    seen, merged = set(), []
    for text in catalog_texts + [check_explanation(t) for t in (extra or [])]:
        if text not in seen:
            seen.add(text)
            merged.append(text)
    return merged
