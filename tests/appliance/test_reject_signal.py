"""The reject signal against a real pymodbus client on loopback, as a PLC would poll it."""
from __future__ import annotations

import socket
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("pymodbus")

from pymodbus.client import ModbusTcpClient  # noqa: E402

from appliance.config import config_from_dict  # noqa: E402
from appliance.reject_signal import (ENTRY, HEADER, RING, STATE_CODES, ModbusRejectSignal,  # noqa: E402
                                     RejectSignalConfig)
from appliance.service import Appliance  # noqa: E402
from models.errors import ConfigError  # noqa: E402
from tests.helpers import wait_for  # noqa: E402

STATES = {code: state for state, code in STATE_CODES.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Plc:
    """A line controller's polling loop: the outcomes it has read, in the order it read them."""

    def __init__(self, port: int):
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        self.seen: list[tuple[int, str, int, int, int]] = []     # (n, state, part id, model, verdict)
        self.last = 0

    def connect(self) -> None:
        assert self.client.connect()

    def poll(self) -> None:
        head = self.client.read_holding_registers(0, count=HEADER, device_id=1).registers
        newest = head[0] << 16 | head[1]
        assert head[2] == RING and newest - self.last <= RING, "fell more than the ring behind"
        for n in range(self.last + 1, newest + 1):
            r = self.client.read_holding_registers(HEADER + ENTRY * ((n - 1) % RING), count=ENTRY,
                                                   device_id=1).registers
            self.seen.append((r[0] << 16 | r[1], STATES[r[2]], r[3] << 16 | r[4], r[5], r[6]))
        self.last = newest


def test_a_plc_reads_every_outcome_in_order_and_cannot_write(tmp_path):
    signal = ModbusRejectSignal(RejectSignalConfig(port=free_port())).start()
    plc = Plc(signal.cfg.port)
    try:
        plc.connect()
        plc.poll()
        assert plc.seen == []
        for i in range(150):                                    # more than the ring, polled as it goes
            signal.publish(["ok", "ng", "review"][i % 3], 70_000 + i, 2, i % 8 if i % 5 else None)
            if i % 20 == 0:
                plc.poll()
        plc.poll()
        assert [s[0] for s in plc.seen] == list(range(1, 151))
        assert plc.seen[1] == (2, "ng", 70_001, 2, 1) and plc.seen[5][4] == 0xFFFF   # uint32 id, free text
        assert plc.client.write_register(0, 7, device_id=1).isError()
    finally:
        plc.client.close()
        signal.stop()


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            ModbusRejectSignal(RejectSignalConfig(port=busy.getsockname()[1])).start()


@pytest.mark.parametrize("settings, words", [
    ({"protocol": "opcua"}, "protocol must be modbus"),
    ({"port": 0}, "is not a TCP port"),
    ({"device_id": 300}, "device_id must be a Modbus unit id"),
    ({"plc": "x"}, "unknown reject_signal key(s) plc"),
])
def test_bad_reject_signal_settings_are_refused(settings, words):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"reject_signal": settings})
    assert words in str(caught.value)


def test_the_appliance_publishes_one_outcome_per_inspection_and_keeps_its_rate_without_the_plc(
        tiny_bundle, tmp_path):
    bundle, public, _ = tiny_bundle
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        cv2.imwrite(str(frames / f"f{i}.png"), np.random.default_rng(i).integers(40, 220, (96, 96), np.uint8))
    port = free_port()
    app = Appliance(config_from_dict({
        "state_dir": str(tmp_path / "state"), "bundle": str(bundle), "trusted_keys": [str(public)],
        "source": str(frames), "max_fps": 10, "save_frames": False, "reject_signal": {"port": port}}))
    app.start()
    plc = Plc(port)
    try:
        plc.connect()
        wait_for(lambda: (plc.poll(), len(plc.seen) >= 10)[1], timeout=30, what="ten outcomes at the PLC")
        plc.client.close()                                      # the PLC goes away for 3 s
        before = app.status()["inspections"]
        time.sleep(3.0)
        during = app.status()["inspections"] - before
        plc.connect()
        wait_for(lambda: (plc.poll(), len(plc.seen) >= 50)[1], timeout=30, what="fifty outcomes")
    finally:
        plc.client.close()
        app.stop()
    assert during >= 20, f"only {during} inspections in 3 s at 10 frames/s while the PLC was away"
    from appliance.decide import outcome
    from appliance.store import Store
    with Store(app.cfg.db_path) as store:
        rows = {r["id"]: r for r in store.history(limit=1000)}
    assert [s[0] for s in plc.seen] == list(range(1, len(plc.seen) + 1))        # none lost, in order
    part_ids = [s[2] for s in plc.seen]
    assert part_ids == sorted(i for i in rows if i <= part_ids[-1])            # one per inspection
    for _, state, part_id, model, _ in plc.seen:
        row = rows[part_id]
        assert model == 1 and state == outcome(row["flagged"], app.runtime.is_defective(row["verdict"]))
