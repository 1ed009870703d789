"""One port for the operator: the API routes, with the Gradio touchscreen mounted at /."""
from __future__ import annotations

import logging
import signal

import gradio as gr
import uvicorn

from appliance.api import create_api
from appliance.config import ApplianceConfig
from appliance.service import Appliance
from appliance.ui import CSS, create_ui

log = logging.getLogger("linejudge.appliance")


def build_app(appliance: Appliance):
    app = create_api(appliance)
    return gr.mount_gradio_app(app, create_ui(appliance), path="/", css=CSS, footer_links=[])


def serve(cfg: ApplianceConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    appliance = Appliance(cfg)
    appliance.start()
    app = build_app(appliance)
    log.info("touchscreen and API on http://%s:%s", cfg.host, cfg.port)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        appliance.stop()
    return 0
