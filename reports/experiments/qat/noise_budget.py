"""Where the INT8 image encoder's error comes from: the fake-quantized forward of qat_probe.py
with only the weights, only the activations, or both quantized (and with 8-bit weights, which
the AVX2 pair-sum limit rules out), each against the fp32 forward on the val cells.

    .venv/bin/python reports/experiments/qat/noise_budget.py runs/full-v3-avx2
"""
import sys

import qat_probe as qp


def main(run: str) -> None:
    model, frames = qp.load(run)
    enc, val = model.image_encoder.eval(), frames["val"]
    ref = qp.batched(enc, val)
    for label, weights, acts in (("weights 7-bit + activations", 64, True), ("activations only", None, True),
                                 ("weights 7-bit only", 64, False), ("weights 8-bit only", 127, False),
                                 ("weights 8-bit + activations", 127, True)):
        q = qp.Ranges(enabled=acts)
        qp.WEIGHT_LEVEL = weights or 64
        original = qp.fq_weight
        if weights is None:
            qp.fq_weight = lambda w: w
        qp.calibrate(enc, q, frames["train"])
        print(f"{label:30s} {qp.snr(ref, qp.batched(lambda x: qp.fq_encoder(enc, x, q), val)):.1f} dB")
        qp.fq_weight = original


if __name__ == "__main__":
    main(sys.argv[1])
