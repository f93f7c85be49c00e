#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the test vectors (tests/vectors/*.json) and the shipped
relay.toml. Standard library only; each seed is named by the SHA-1 of its bytes, as libFuzzer
names what it finds, so running this again adds nothing twice.

    python3 fuzz/seed.py

The input shapes are those of fuzz/src/lib.rs: `envelope` and `message` take a document,
`decrypt` takes a shape byte (even: query, newline, Encrypt; odd: a plaintext that the target
encrypts itself), `config` takes a relay.toml.
"""

import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
# The account of fuzz/src/lib.rs (the generated vectors').
TOKEN = "relayToken2024"
ENCODING_AES_KEY = "RelayVectorsEncodingAESKey0123456789abcdefZ"
APP_ID = "wxa1b2c3d4e5f60789"


def objects(value):
    """Every JSON object in `value`, depth first."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from objects(child)
    elif isinstance(value, list):
        for child in value:
            yield from objects(child)


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def query_of(v):
    if "query_string" in v:
        return v["query_string"]
    parts = [f"{k}={v[k]}" for k in ("signature", "timestamp", "nonce") if k in v]
    parts.append("encrypt_type=aes")
    for k in ("msg_signature", "msg_signature_derived"):
        if k in v:
            parts.append(f"msg_signature={v[k]}")
            break
    return "&".join(parts)


def plaintext(random16, xml, app_id):
    """random(16) || u32_be(len) || xml || app id || PKCS#7 to 32 (PROTOCOL.md section 4)."""
    body = random16 + struct.pack(">I", len(xml)) + xml + app_id
    pad = 32 - len(body) % 32
    return body + bytes([pad]) * pad


def plaintexts(random16, xml):
    """A valid plaintext for the account and the refusals around it (PROTOCOL.md section 9)."""
    good = plaintext(random16, xml, APP_ID.encode())
    yield good
    yield plaintext(random16, xml, b"wx0000000000000000")  # another app id (-40005)
    for delta in (1, -1):  # the length field off by one (-40008, -40005)
        length = struct.pack(">I", len(xml) + delta)
        yield good[:16] + length + good[20:]
    yield good[:-1] + b"\x00"  # padding 0 (-40007)
    yield good[:-1] + b"\x21"  # padding 33
    yield good[:-2] + bytes([good[-2] ^ 1, good[-1]])  # a pad byte that differs


def seed_vectors():
    for path in sorted((ROOT / "tests" / "vectors").glob("*.json")):
        for v in objects(json.loads(path.read_text())):
            for key, value in v.items():
                if not isinstance(value, str):
                    continue
                if "body" in key and value.lstrip("\ufeff").lstrip().startswith("<"):
                    write("envelope", value)
                if key in ("plaintext_xml", "decrypted_xml", "reply_plaintext_xml") or (
                    key == "plaintext" and value.startswith("<")
                ):
                    write("message", value)
            if isinstance(v.get("encrypt"), str):
                write("decrypt", b"\x00" + f"{query_of(v)}\n{v['encrypt']}".encode())
            xml = v.get("plaintext_xml") or v.get("reply_plaintext_xml")
            if isinstance(xml, str) and isinstance(v.get("random16"), str):
                random16 = v["random16"].encode()
                if len(random16) == 16:
                    for plain in plaintexts(random16, xml.encode()):
                        write("decrypt", b"\x01" + plain)


def seed_configs():
    shipped = (ROOT / "relay.toml").read_text()
    write("config", shipped)
    account = (
        f'[[account]]\nname = "main"\npath = "/wechat"\napp_id = "{APP_ID}"\n'
        f'token = "{TOKEN}"\nencoding_aes_key = "{ENCODING_AES_KEY}"\n'
    )
    server = (
        '[server]\nlisten = "127.0.0.1:0"\nreply_deadline_ms = 2000\n'
        "timestamp_skew_s = 300\nshutdown_grace_ms = 2000\n"
    )
    targets = (
        '[[target]]\nname = "idp"\nurl = "http://127.0.0.1:9000/events"\nformat = "raw"\n'
        '[[target]]\nname = "crm"\nurl = "https://user:pw@crm.example.com/hook?k=v"\n'
        'format = "json"\nsecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'
        'retry_initial_ms = 10\nretry_max_ms = 100\nmax_attempts = 3\nmax_age_s = 60\n'
    )
    routes = (
        '[[route]]\nname = "qr"\naccount = "main"\nmsg_type = ["event"]\n'
        'event = ["subscribe", "SCAN"]\nticket = true\nevent_key = ["qrscene_*"]\n'
        'to = ["idp", "crm"]\nreply = "idp"\n'
        '[[route]]\ncontent = ["refund*"]\nto = ["crm"]\nreply_text = "hi"\n'
    )
    write("config", server + account + 'mode = "safe"\n' + targets + routes)
    write(
        "config",
        server
        + account
        + f'mode = "compatible"\nprevious_encoding_aes_key = "{ENCODING_AES_KEY}"\n'
        + '[store]\npath = "data"\ndedupe_ttl_s = 300\n[log]\nformat = "json"\n'
        + 'level = "info,wechat_relay=debug"\ncontent = true\n[admin]\nlisten = "127.0.0.1:9090"\n',
    )
    write(
        "config",
        server
        + f'[[account]]\nname = "plain"\npath = "/p"\napp_id = "{APP_ID}"\n'
        + 'token_file = "token"\nmode = "plaintext"\n'
        + '[server.tls]\ncert = "cert.pem"\nkey = "key.pem"\n',
    )


if __name__ == "__main__":
    seed_vectors()
    seed_configs()
    for target in sorted(CORPUS.iterdir()):
        print(target.name, len(list(target.iterdir())))
