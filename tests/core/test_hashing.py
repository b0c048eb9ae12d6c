from modsquad.core.hashing import file_sha256, json_sha256


def test_file_sha256_of_known_bytes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")  # FIPS 180-2 test vector
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path, chunk=1) == file_sha256(path)


def test_json_sha256_ignores_key_order_and_spacing():
    assert json_sha256({"a": 1, "b": [1, 2]}) == json_sha256({"b": [1, 2], "a": 1})
    assert json_sha256({"a": 1}) != json_sha256({"a": 2})
