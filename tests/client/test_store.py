"""The sealed device store, attacked as someone who copies or edits the device's folder would,
and crashed as a phone's process is (kill -9 in the middle of a write)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedrec.client.sealed import SealedFileError, StoreKey
from fedrec.client.store import DeviceStore, TooFewEvents, device_files
from fedrec.shared.data.catalog_bundle import CatalogBundle, save_catalog

ITEMS = [str(i) for i in range(100, 120)]
LEDGER_SPENT = [(1.5, 0.25, 2)]


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "catalog.npz"
    save_catalog(CatalogBundle(np.asarray(ITEMS), np.zeros((len(ITEMS), 0), np.float32)), path)
    return path


@pytest.fixture
def store(tmp_path, catalog):
    return DeviceStore.create(tmp_path / "dev", catalog, key_file=tmp_path / "dev.key")


def test_events_round_trip_into_the_log_the_model_reads(store, tmp_path):
    store.add_events([("105", 3.0), ("101", 1.0), ("105", 4.0), ("102", 2.0), ("107", None)])
    again = DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "dev.key")
    log = again.user_log()
    # by time; a repeat of 105 dropped after its first time; catalog index = position + 1
    assert log.train.tolist() == [2, 3] and log.valid == 6 and log.test == 8
    assert (tmp_path / "dev.key").stat().st_mode & 0o777 == 0o600
    assert b"105" not in (tmp_path / "dev" / "log.sealed").read_bytes()   # sealed, not just stored


def test_nothing_readable_or_changeable_without_the_key(store, tmp_path, catalog):
    store.add_events([(i, float(n)) for n, i in enumerate(ITEMS[:5])])
    StoreKey.new_file(tmp_path / "other.key")
    with pytest.raises(SealedFileError, match="wrong key"):
        DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "other.key")
    log_file = tmp_path / "dev" / "log.sealed"
    blob = bytearray(log_file.read_bytes())
    blob[-20] ^= 1                                   # one flipped bit
    log_file.write_bytes(bytes(blob))
    with pytest.raises(SealedFileError, match=r"log\.sealed: fails its integrity check"):
        store.events()
    log_file.write_bytes(bytes(blob[:30]))           # a torn write
    with pytest.raises(SealedFileError, match=r"log\.sealed: not a sealed fedrec file, or cut short"):
        store.events()


def test_a_file_swapped_for_another_of_the_store_is_refused(store, tmp_path):
    """The ledger cannot be replaced by another sealed file of the store (its role is in the AAD)."""
    folder = tmp_path / "dev"
    (folder / "ledger.sealed").write_bytes((folder / "log.sealed").read_bytes())
    with pytest.raises(SealedFileError, match="ledger.sealed: fails its integrity check"):
        store.ledger.read()


def test_an_open_key_file_is_refused(tmp_path, catalog):
    DeviceStore.create(tmp_path / "dev", catalog, key_file=tmp_path / "dev.key")
    os.chmod(tmp_path / "dev.key", 0o644)
    with pytest.raises(SealedFileError, match="readable by others.*chmod 600"):
        DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "dev.key")


def test_a_passphrase_store_and_its_errors(tmp_path, catalog, monkeypatch):
    DeviceStore.create(tmp_path / "dev", catalog, passphrase="correct horse")
    with pytest.raises(SealedFileError, match="FEDREC_STORE_PASSPHRASE"):
        DeviceStore.open(tmp_path / "dev")
    with pytest.raises(SealedFileError, match="wrong key or passphrase"):
        DeviceStore.open(tmp_path / "dev", passphrase="battery staple")
    monkeypatch.setenv("FEDREC_STORE_PASSPHRASE", "correct horse")
    assert DeviceStore.open(tmp_path / "dev").events() == []
    # The header is plain: whoever edits it must not choose scrypt's cost (2^30 would exhaust memory).
    header = tmp_path / "dev" / "store.json"
    edited = json.loads(header.read_text())
    edited["kdf"]["scrypt"]["n"] = 2 ** 30
    header.write_text(json.dumps(edited))
    with pytest.raises(SealedFileError, match="scrypt parameters .* refusing them"):
        DeviceStore.open(tmp_path / "dev")


def test_unknown_items_and_short_logs_are_clear_errors(store):
    with pytest.raises(SealedFileError, match="999 are not in this store's catalog"):
        store.add_events([("999", None)])
    store.add_events([("101", 1.0), ("101", 2.0), ("102", 3.0)])
    with pytest.raises(TooFewEvents, match="2 distinct catalog item"):
        store.user_log()


def test_the_handlers_read_the_sealed_store_from_node_config(store, tmp_path):
    store.add_events([(i, float(n)) for n, i in enumerate(ITEMS[:6])])
    files = device_files({"device-store": str(tmp_path / "dev"), "store-key-file": str(tmp_path / "dev.key")}, {})
    assert files.user_log().test == 6 and files.ledger.read() == []
    files.ledger.write([(1.0, 0.5, 3)])
    assert store.ledger.read() == [(1.0, 0.5, 3)]


KILLER = textwrap.dedent("""
    import sys
    from fedrec.client.store import DeviceStore
    store = DeviceStore.open(sys.argv[1], key_file=sys.argv[2])
    for n in range(100000):
        total = store.add_events([(str(100 + n % 20), float(n))])
        print(total, flush=True)
""")


@pytest.mark.parametrize("after", [3, 17, 40])
def test_kill_9_during_add_event_loses_at_most_that_event(store, tmp_path, after):
    """A process appending events is killed (SIGKILL) at an arbitrary point: the store still opens,
    and holds every event whose add returned, plus at most the one being written."""
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path / "dev"), str(tmp_path / "dev.key")],
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    acknowledged = 0
    for line in proc.stdout:          # wait for writes to be acknowledged, not for a time
        acknowledged = int(line)
        if acknowledged >= after:
            break
    proc.send_signal(signal.SIGKILL)
    for line in proc.stdout:          # acknowledgements printed before the kill landed
        acknowledged = int(line)
    proc.wait()
    kept = len(DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "dev.key").events())
    # Every acknowledged event is kept; the one being added when the kill came may or may not be.
    assert acknowledged <= kept <= acknowledged + 1


def test_a_store_that_lost_its_header_is_never_made_afresh(store, tmp_path, catalog):
    """Deleting store.json (no key needed) and then following the error's advice must not hand the
    device an empty ledger: a fresh privacy budget."""
    store.ledger.write(LEDGER_SPENT)
    (tmp_path / "dev" / "store.json").unlink()
    with pytest.raises(SealedFileError, match="damaged; restore it from a backup"):
        DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "dev.key")
    with pytest.raises(SealedFileError, match="not empty"):
        DeviceStore.create(tmp_path / "dev", catalog, key_file=tmp_path / "dev.key")


def test_a_file_of_another_store_with_the_same_key_is_refused(store, tmp_path, catalog):
    """Two stores sealed with one key file: the empty ledger of the second is not accepted in the first."""
    other = DeviceStore.create(tmp_path / "other", catalog, key_file=tmp_path / "dev.key")
    store.ledger.write(LEDGER_SPENT)
    (tmp_path / "dev" / "ledger.sealed").write_bytes((tmp_path / "other" / "ledger.sealed").read_bytes())
    with pytest.raises(SealedFileError, match="fails its integrity check"):
        store.ledger.read()
    assert other.ledger.read() == []


def test_the_dp_ledger_spends_through_the_sealed_store_and_refuses_without_it(store, tmp_path):
    from fedrec.client.privacy import PrivacyLedger, PrivacyRefusal
    ledger = PrivacyLedger(store.ledger)
    ledger.spend((1.0, 0.5, 3), budget=100.0, delta=1e-5)
    assert DeviceStore.open(tmp_path / "dev", key_file=tmp_path / "dev.key").ledger.read() == [(1.0, 0.5, 3)]
    (tmp_path / "dev" / "ledger.sealed").unlink()
    with pytest.raises(PrivacyRefusal, match="ledger is missing"):
        PrivacyLedger(store.ledger)


def test_given_once_lives_in_the_ledger_and_survives_spending(store):
    """The once-only record of the exact counts sits in the sealed ledger: no file to delete to give
    them twice, and spending (which rewrites the ledger) keeps it."""
    from fedrec.client.privacy import PrivacyLedger
    assert store.ledger.give_once("counts", "round 3 run 7\n")
    PrivacyLedger(store.ledger).spend((1.0, 0.5, 1), budget=100.0, delta=1e-5)
    assert not store.ledger.give_once("counts", "round 4 run 8\n")
    assert store.ledger.given("counts") == "round 3 run 7\n"
    assert sorted(p.name for p in store.folder.iterdir() if "given" in p.name) == []


def test_a_changed_catalog_is_refused_until_taken_on_purpose(store, tmp_path):
    """Reordering the catalog's ids (no key needed) would map the log to items someone else chose."""
    store.add_events([(i, float(n)) for n, i in enumerate(ITEMS[:5])])
    swapped = tmp_path / "swapped.npz"
    save_catalog(CatalogBundle(np.asarray(ITEMS[::-1]), np.zeros((len(ITEMS), 0), np.float32)), swapped)
    (tmp_path / "dev" / "catalog.npz").write_bytes(swapped.read_bytes())
    with pytest.raises(SealedFileError, match="not the file this store sealed.*update-catalog"):
        store.user_log()
    store.update_catalog(swapped)                    # the owner takes a new catalog on purpose
    assert store.user_log().test == len(ITEMS) - 4   # item 104 is at position 16 of the reversed ids


def test_an_edited_server_ca_certificate_stops_the_supernode_start(tmp_path, catalog):
    """Someone who can write the store folder swaps in their own CA certificate (with a network
    position, their server would then be trusted): the device refuses to start."""
    import json
    from fedrec.client import device
    from fedrec.server.pki import enrol_device, make_ca
    make_ca(tmp_path / "ca")
    device.init(tmp_path / "d", catalog, key_file=tmp_path / "d.key", passphrase=None, name="d")
    store = DeviceStore.open(tmp_path / "d", key_file=tmp_path / "d.key")
    enrol_device(tmp_path / "ca", tmp_path / "d" / "request.json", tmp_path / "d.grant")
    said = device.enrol(store, tmp_path / "d.grant")
    assert "TLS CA sha256" in said
    device.supernode_argv(store, tmp_path / "d.key", "h:1", 9094)          # as enrolled: fine
    make_ca(tmp_path / "evil")
    (tmp_path / "d" / "ca.crt").write_text((tmp_path / "evil" / "ca.crt").read_text())
    with pytest.raises(SealedFileError, match=r"ca\.crt: not the file this store sealed"):
        device.supernode_argv(store, tmp_path / "d.key", "h:1", 9094)
    assert json.loads((tmp_path / "d.grant").read_text())["name"] == "d"
