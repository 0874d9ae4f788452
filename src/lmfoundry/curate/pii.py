"""PII redaction: personal identifiers replaced by typed placeholders, counted per type.

    text, counts = redact("mail kim@example.co.kr or call 010-1234-5678")
    # "mail <EMAIL> or call <PHONE>", {"email": 1, "phone": 1}

| type        | placeholder    | what matches (and what must also hold)                                   |
| email       | <EMAIL>        | local@domain.tld                                                          |
| kr_rrn      | <KR_RRN>       | Korean resident registration number YYMMDD-SNNNNNN (S 1-8, a real month  |
|             |                | and day); no check digit is required: numbers issued since Oct 2020 have  |
|             |                | random final digits. The masked form YYMMDD-S****** too.                 |
| credit_card | <CREDIT_CARD>  | 13-19 digits, optionally in groups split by spaces or hyphens, passing    |
|             |                | the Luhn check                                                            |
| phone       | <PHONE>        | international (+CC ...), Korean (010-1234-5678, 02-123-4567, (031)       |
|             |                | 123-4567, 1588-1234) and North American (555-123-4567) forms; separators |
|             |                | required between groups, so dates and plain numbers stay                  |
| ipv6        | <IP_ADDRESS>   | anything Python's ipaddress accepts as IPv6 (times and MACs do not pass)  |
| ipv4        | <IP_ADDRESS>   | dotted quads, public addresses only by default (as datatrove)             |
"""
from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {"email": "<EMAIL>", "kr_rrn": "<KR_RRN>", "credit_card": "<CREDIT_CARD>", "phone": "<PHONE>",
                "ipv6": "<IP_ADDRESS>", "ipv4": "<IP_ADDRESS>"}
TYPES = tuple(PLACEHOLDERS)

_SEP = r"[ .\-]"
PATTERNS = {
    "email": r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "kr_rrn": r"(?<![\d-])\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]) ?- ?[1-8](?:\d{6}|\*{6})(?![\d*])",
    "credit_card": r"(?<![\d-])(?:\d{4}[ -]){3}\d{1,7}(?![\d-])|(?<![\d-])\d{13,19}(?![\d-])",
    "phone": (r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(\d{1,4}\))?(?:" + _SEP + r"?\d{1,5}){2,5}(?![\d-])"
              r"|(?<![\w-])\(0\d{1,2}\) ?\d{3,4}[ .\-]\d{4}(?![\d-])"
              r"|(?<![\w-])0(?:2|[3-6][1-5]|1[016789]|70|50\d|80)" + _SEP + r"\d{3,4}" + _SEP + r"\d{4}(?![\d-])"
              r"|(?<![\w-])1[568]\d{2}-(?!1[5-9]\d{2}\b|20\d{2}\b)\d{4}(?![\d-])"
              r"|(?<![\w-])\(?[2-9]\d{2}\)?[ .\-]\d{3}[ .\-]\d{4}(?![\d-])"),
    "ipv6": r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])",
    "ipv4": r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)",
}
_HINT = re.compile(r"[\d@:]")
_COMBINED = re.compile("|".join(f"(?P<{name}>{p})" for name, p in PATTERNS.items()))


def luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _valid(kind: str, s: str, public_ips_only: bool) -> bool:
    if kind == "credit_card":
        digits = re.sub(r"\D", "", s)
        return 13 <= len(digits) <= 19 and luhn(digits)
    if kind in ("ipv4", "ipv6"):
        try:
            ip = ipaddress.ip_address(s)
        except ValueError:
            return False
        return ip.version == int(kind[-1]) and (ip.is_global or not public_ips_only)
    if kind == "phone":
        return sum(c.isdigit() for c in s) >= 7
    return True


def redact(text: str, types=TYPES, public_ips_only: bool = True) -> tuple[str, dict[str, int]]:
    """(text with each identifier of `types` replaced by its placeholder, {type: count})."""
    counts: dict[str, int] = {}

    def replace(m: re.Match) -> str:
        kind = m.lastgroup
        s = m.group()
        if kind not in types or not _valid(kind, s, public_ips_only):
            return s
        counts[kind] = counts.get(kind, 0) + 1
        return PLACEHOLDERS[kind]

    if not _HINT.search(text):
        return text, counts
    return _COMBINED.sub(replace, text), counts
