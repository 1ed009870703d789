"""The line's reject signal over Modbus TCP: each camera inspection's outcome, for the PLC.

The appliance is a Modbus TCP server (pymodbus); the line's controller polls its holding
registers (read-only, device id `device_id`):

    address 0-1   the newest outcome's sequence number n (uint32, high word first); 0 = none yet
    address 2     RING, how many outcomes the ring keeps
    address 3 + ENTRY * ((n - 1) % RING), ENTRY registers per outcome:
        +0-1  sequence number n (uint32)
        +2    state: 1 OK, 2 NG, 3 REVIEW (see STATE_CODES)
        +3-4  part id: the appliance's inspection id (uint32)
        +5    model version
        +6    verdict: its position in the bundle's catalog, 0xFFFF for free text
        +7    0 (reserved)

A PLC reads the sequence number and then each outcome it has not seen, in order; it may fall
up to RING outcomes behind without losing one (a gap larger than RING tells it that it has).
publish() only writes memory under a lock: a PLC that is slow, disconnects or never connects
cannot hold up an inspection. Only camera inspections are published (API test calls are not
parts on the line).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from models.common import is_whole, section_values
from models.errors import ConfigError

log = logging.getLogger("linejudge.reject_signal")

RING, ENTRY, HEADER = 64, 8, 3
STATE_CODES = {"ok": 1, "ng": 2, "review": 3}
FREE_TEXT = 0xFFFF


@dataclass(frozen=True)
class RejectSignalConfig:
    protocol: str = "modbus"
    host: str = "127.0.0.1"       # 0.0.0.0 to let the PLC reach it over the plant network
    port: int = 5020              # 502 is Modbus's own port (needs CAP_NET_BIND_SERVICE)
    device_id: int = 1

    def __post_init__(self):
        if self.protocol != "modbus":
            raise ConfigError(f"reject_signal: protocol must be modbus (Modbus TCP), not {self.protocol!r}")
        if not is_whole(self.port) or not 0 < self.port < 65536:
            raise ConfigError(f"reject_signal: port {self.port!r} is not a TCP port; e.g. port: 5020")
        if not is_whole(self.device_id) or not 0 <= self.device_id <= 247:
            raise ConfigError(f"reject_signal: device_id must be a Modbus unit id from 0 to 247, not {self.device_id!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"reject_signal: host must be an address to listen on, e.g. 0.0.0.0, not {self.host!r}")


def reject_signal_from_dict(data, where: str = "config") -> RejectSignalConfig | None:
    if data is None:
        return None
    return RejectSignalConfig(**section_values(data, "reject_signal", RejectSignalConfig.__dataclass_fields__,
                                               "{port: 5020}", where))


def _words(value: int) -> list[int]:
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


class ModbusRejectSignal:
    """The register image above, served by pymodbus in its own thread and event loop."""

    def __init__(self, cfg: RejectSignalConfig):
        self.cfg = cfg
        self.published = 0
        self._registers = [0] * (HEADER + RING * ENTRY)
        self._registers[2] = RING
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reject-signal", daemon=True)

    def start(self, timeout: float = 10.0) -> "ModbusRejectSignal":
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            raise ConfigError(f"reject_signal: cannot listen on {self.cfg.host}:{self.cfg.port} "
                              f"({self._error or 'no answer'}); is another program using the port?")
        log.info("reject signal: Modbus TCP on %s:%d, device %d", self.cfg.host, self.cfg.port, self.cfg.device_id)
        return self

    def publish(self, state: str, part_id: int, model_version: int, verdict_index: int | None) -> int:
        """Add one outcome to the ring; returns its sequence number. Never blocks on the network."""
        with self._lock:
            self.published += 1
            n = self.published
            entry = [*_words(n), STATE_CODES[state], *_words(part_id), int(model_version) & 0xFFFF,
                     FREE_TEXT if verdict_index is None else verdict_index, 0]
            start = HEADER + ENTRY * ((n - 1) % RING)
            self._registers[start:start + ENTRY] = entry
            self._registers[0:2] = _words(n)
        return n

    def stop(self) -> None:
        if self._loop and self._server and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(timeout=5)
        self._thread.join(timeout=5)

    async def _answer(self, function_code, start_address, address, count, registers, values):
        """pymodbus's per-request hook: fill its registers from ours; refuse writes."""
        from pymodbus.constants import ExcCodes
        if values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        with self._lock:
            registers[:] = self._registers[:len(registers)]
        return None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:      # reported by start(); a later failure only logged
            self._error = exc
            self._ready.set()
            log.exception("reject signal server stopped")

    async def _serve(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice
        device = SimDevice(id=self.cfg.device_id, action=self._answer,
                           simdata=[SimData(0, count=len(self._registers), values=0, datatype=DataType.REGISTERS)])
        self._loop = asyncio.get_running_loop()
        self._server = ModbusTcpServer(device, address=(self.cfg.host, self.cfg.port))
        await self._server.serve_forever(background=True)
        self._ready.set()
        await self._server.serving
