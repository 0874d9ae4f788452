"""PII redaction: a table of identifiers that must be replaced and look-alikes that must stay."""
import pytest

from lmfoundry.curate.pii import luhn, redact

POSITIVES = [  # (text, type)
    ("write to kim.minsu@example.co.kr today", "email"),
    ("contact: first.last+tag@mail-server.example.org.", "email"),
    ("RRN 900101-1234567 on file", "kr_rrn"),
    ("issued after 2020: 011231-3918274", "kr_rrn"),           # random final digits, no check digit
    ("masked 851231-2******", "kr_rrn"),
    ("foreign resident 950615-5123456", "kr_rrn"),
    ("card 4111 1111 1111 1111 exp 12/29", "credit_card"),
    ("amex 378282246310005", "credit_card"),
    ("card 5555-5555-5555-4444", "credit_card"),
    ("mobile 010-1234-5678", "phone"),
    ("seoul office 02-123-4567", "phone"),
    ("gyeonggi (031) 123-4567", "phone"),
    ("call 031.987.6543", "phone"),
    ("international +82-10-1234-5678", "phone"),
    ("US +1 (555) 123-4567", "phone"),
    ("UK +44 20 7946 0958", "phone"),
    ("customer centre 1588-1234", "phone"),
    ("NANP 555-123-4567", "phone"),
    ("server 8.8.8.8 answered", "ipv4"),
    ("ipv6 2001:4860:4860::8888 answered", "ipv6"),
    ("full 2607:f8b0:4005:0805:0000:0000:0000:200e address", "ipv6"),
]

NEGATIVES = [
    "the meeting is on 2023-10-05 at 12:30:45",                 # a date and a time
    "dates 2023.10.05 and 05/10/2023 and 20231005",
    "years 1588-1600 and 1950-2000",                              # look like representative numbers
    "card-like 4111 1111 1111 1112 fails Luhn",
    "order number 1234567890123 fails Luhn",
    "isbn 978-3-16-148410-0",
    "private 192.168.0.1 and loopback 127.0.0.1",                 # not public: kept (as datatrove)
    "mac 00:1A:2B:3C:4D:5E is not an IP",
    "not a date of birth: 901301-1234567 (month 13)",
    "version 3.14 and ratio 1:2:3",
    "score 3-2 and room 12-34",
    "price 1,234,567 won",
    "email-like user@localhost has no domain",
]


@pytest.mark.parametrize("text,kind", POSITIVES)
def test_identifiers_are_replaced_by_typed_placeholders(text, kind):
    out, counts = redact(text)
    assert counts == {kind: 1}, (out, counts)
    placeholder = {"ipv4": "<IP_ADDRESS>", "ipv6": "<IP_ADDRESS>"}.get(kind, f"<{kind.upper()}>")
    assert placeholder in out


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_left_alone(text):
    assert redact(text) == (text, {})


def test_counts_per_type_and_a_type_subset():
    text = "a@b.com, c@d.org, 010-1111-2222, 8.8.4.4"
    out, counts = redact(text)
    assert counts == {"email": 2, "phone": 1, "ipv4": 1}
    out, counts = redact(text, types=("email",))
    assert counts == {"email": 2} and "010-1111-2222" in out


def test_private_ips_are_redacted_when_asked():
    assert redact("host 192.168.0.1", public_ips_only=False)[1] == {"ipv4": 1}


def test_luhn_matches_published_test_numbers():
    assert all(luhn(n) for n in ("4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"))
    assert not any(luhn(n) for n in ("4111111111111112", "1234567812345678"))
