#!/usr/bin/env python3
"""Writes the fuzz seed corpus from the spec's test vectors (spec/vectors/) and a few
hand-made documents. Run from the repository root: python3 fuzz/seed_corpus.py"""
import hashlib, json, os, subprocess, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
corpus = os.path.join(root, "fuzz", "corpus")

def put(target, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

frames = json.load(open(os.path.join(root, "spec/vectors/frames.json")))["vectors"]
for v in frames:
    body = bytes.fromhex(v["cbor_hex"])
    put("client_request" if v["kind"] == "request" else "client_response", body)
fed = json.load(open(os.path.join(root, "spec/vectors/federation.json")))
for e in fed["envelopes"]:
    put("signed_unit", bytes.fromhex(e["envelope_cbor_hex"]))
for f in fed["frames"]:
    put("federation_frame", bytes.fromhex(f["cbor_hex"]))
put("key_document", json.dumps({
    "server_name": "beta.example", "federation": "fed.beta.example:7451",
    "keys": [{"id": fed["key_id"], "key": fed["public_key"]},
             {"id": "Q9r8s7t6u5v", "key": fed["public_key"], "valid_until_ms": 1790000000000}],
}).encode())
for ident in ["@alice:alpha.example", "alpha.example", fed["public_key"], "DEVICE-1_a", "@Bob:x", "a..b"]:
    put("identifiers", ident.encode())
put("config", open(os.path.join(root, "fuzz", "seed_config.toml"), "rb").read())
print("corpus written to", corpus)
