"""Table keys: escaping key components, composite keys, and long strings spread over several properties."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

#: PartitionKey / RowKey size: 1 KiB of UTF-16, i.e. 512 code units (Azurite 3.35 rejects the 513th too).
MAX_KEY_UNITS: Final = 512
#: UTF-16 units per string property part: the service allows 32,768 (64 KiB); the rest is margin.
PART_UNITS: Final = 32_000
#: UTF-16 units of one long string across its parts: 960,000 bytes, under the 1 MiB entity limit with the rest.
MAX_STRING_UNITS: Final = 480_000


ESCAPE: Final = "~"
SEPARATOR: Final = "|"
# Allow-list rather than the documented deny-list (/ \ # ? and control characters): punctuation that is
# legal still breaks somewhere: "%" is a known cause of failing point operations on the service, "'" of
# Azurite and Storage Explorer bugs, and ":", "@", "=", "!" and other sub-delimiters fail SharedKey signing
# through azure-core's requests transport (checked on Azurite 3.35). Letters, digits, "-", "." and "_",
# and every character from U+00A0 on, worked through every operation with both transports.
_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._")
_ESCAPES: dict[int, str] = {
    **{code: f"{ESCAPE}{code:02X}" for code in range(0xA0) if chr(code) not in _KEEP},
    # lone surrogates cannot be sent as UTF-8 at all; a valid str holds none, but a decoded one might
    **{code: f"{ESCAPE}u{code:04X}" for code in range(0xD800, 0xE000)},
}
_UNESCAPE = re.compile(r"~(?:([0-9A-F]{2})|u([0-9A-F]{4}))")


def escape_key(text: str) -> str:
    """Reversibly map `text` onto characters that are safe in a PartitionKey / RowKey, keeping it readable.

    Every character outside [A-Za-z0-9-._] below U+00A0 (so all of / \\ # ? % ' | ~ and every control
    character) becomes `~XX` (two uppercase hex digits); a lone surrogate becomes `~uXXXX`.
    """
    return text.translate(_ESCAPES)


def unescape_key(text: str) -> str:
    """Invert `escape_key`; raises ValueError on text `escape_key` cannot have produced."""

    def replace(match: re.Match[str]) -> str:
        return chr(int(match.group(1) or match.group(2), 16))

    decoded = _UNESCAPE.sub(replace, text)
    if escape_key(decoded) != text:
        raise ValueError(f"{text!r} is not an escaped table key")
    return decoded


def _utf8(text: str) -> bool:
    """Whether `text` can be sent as UTF-8 (a lone surrogate cannot: it can be stored, not put in a URL)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _units(text: str) -> int:
    """Length in UTF-16 code units, the measure of the service's key and string limits."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


def table_key(*parts: str) -> str:
    """Escape each part and join them with "|" (which `escape_key` never emits); ValueError when too long."""
    key = SEPARATOR.join(escape_key(part) for part in parts)
    if _units(key) > MAX_KEY_UNITS:
        raise ValueError(
            f"table key {key[:80]!r}... is {_units(key)} UTF-16 units once escaped; Azure Table keys hold at"
            f" most {MAX_KEY_UNITS} (1 KiB). Shorten the key, entity, system, table or namespace name."
        )
    return key


def split_key(key: str) -> list[str]:
    """Invert `table_key`: the unescaped parts."""
    return [unescape_key(part) for part in key.split(SEPARATOR)]


def prefix_range(*parts: str) -> tuple[str, str]:
    """[low, high) bounds of every key that starts with `table_key(*parts)` followed by the separator."""
    low = table_key(*parts) + SEPARATOR
    return low, low[:-1] + chr(ord(SEPARATOR) + 1)


# ------------------------------------------------------------------------------- long string properties


def split_string(name: str, text: str, *, what: str) -> dict[str, str]:
    """Spread a string over properties `name`, `name_1`, ... that each stay within the service's limit.

    Raises ValueError when the whole would not fit in one entity (`MAX_STRING_UNITS` UTF-16 units).
    """
    units = _units(text)
    if units > MAX_STRING_UNITS:
        raise ValueError(
            f"{what} is {units:,} UTF-16 units of text; an Azure Table entity holds at most"
            f" {MAX_STRING_UNITS:,} (1 MiB per entity, 64 KiB per property). Keep large content, such as"
            " attachments or very detailed geometry, out of the state store."
        )
    # A code point is one or two UTF-16 units: halving the step for non-ASCII text keeps every part legal.
    step = PART_UNITS if units == len(text) else PART_UNITS // 2
    parts = [text[start : start + step] for start in range(0, len(text), step)] or [""]
    return {name if index == 0 else f"{name}_{index}": part for index, part in enumerate(parts)}


def join_string(entity: Mapping[str, Any], name: str) -> str:
    """Reassemble what `split_string` spread over `name`, `name_1`, ..."""
    parts = [str(entity[name])]
    index = 1
    while f"{name}_{index}" in entity:
        parts.append(str(entity[f"{name}_{index}"]))
        index += 1
    return "".join(parts)

