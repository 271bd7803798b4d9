"""The device's own rules for exact (un-noised) sums."""
from flwr.app import Context, RecordDict

from fedrec.client.handlers import exact_sum_floor


def test_the_exact_sums_floor_is_the_devices_own_never_the_run_configs():
    """The run config is written by whoever submits the run (the server's side): a floor read from it
    (before session 10's review) let that party set 1 and unmask one device's counts."""
    lowered = {"counts-min-devices": 1}
    device = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=lowered)
    assert exact_sum_floor(device, {}) == 100                       # the default
    assert exact_sum_floor(device, {"counts-min-devices": 10}) == 10   # the app's own settings
    own = Context(run_id=1, node_id=1, node_config={"counts-min-devices": 0}, state=RecordDict(), run_config={})
    assert exact_sum_floor(own, {}) == 2                            # never below 2
