"""Silero VAD rebuilt as one batched, matrix-multiply-shaped ONNX graph per sample rate.

Silero's own graphs run each 32 ms frame through 1-D convolutions over a sequence four steps
long. ONNX Runtime runs such a convolution as one tiny im2col + GEMM per frame, at about a
quarter of what the CPU's matrix units do on one large GEMM, and the 8 kHz mode exists only in
the frame-by-frame graph (one ONNX call per frame). Every layer is linear in its input frame
of fixed size, so the same network is written here as large matrix multiplies over all frames
of all inputs at once:

* STFT: the padded frame is cut into ``kernel / hop + 3`` hops; each window is two adjacent
  hops, so the STFT is one ``(N * 4, kernel) @ (kernel, 2 * bins)`` product;
* each encoder convolution (kernel 3, stride 1 or 2, over 4, 2 or 1 positions) is one dense
  ``(L_in * C_in, L_out * C_out)`` matrix acting on the frame's flattened (position, channel)
  features, built from the convolution's weights;
* the LSTM runs over frames with one batch row per input (``input`` is (B, F, frame + context),
  state (1, B, 128)), so B requests share every recurrent step.

The weights are Silero's (``silero_vad.onnx`` from the ``silero-vad`` wheel, both rate
branches); nothing is retrained. ``tests/test_vad_graph.py`` checks the rebuilt graphs against
Silero's on real and synthetic audio (probabilities within 1e-4, the same segments) and that the
shipped files are what this module builds. Building needs the ``onnx`` package (the ``train``
or ``import`` extras); the service only loads the built files:

    .venv/bin/python -m models.vad_graph   # rewrites models/assets/silero_vad_{16k,8k}_batched.onnx
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SileroWeights", "silero_weights", "build_graph", "dense_conv"]

from models.vad import _FRAMES, NARROWBAND_VAD_MODEL, VAD_MODELS



@dataclass(frozen=True)
class SileroWeights:
    """One rate's Silero VAD network.

    Attributes:
        rate: sample rate (16000 or 8000).
        frame, context: samples per frame and of the previous frame prefixed to it.
        stft: (2 * bins, 1, kernel) STFT basis (real rows, then imaginary rows).
        encoder: [(weight (C_out, C_in, 3), bias (C_out,), stride), ...] with padding 1.
        lstm_w, lstm_r: (1, 4H, C), (1, 4H, H) ONNX-order (i, o, f, c) LSTM weights.
        lstm_b: (1, 8H) input then recurrent biases, ONNX order.
        out_w, out_b: (1, H, 1), (1,) the 1x1 output convolution.
    """

    rate: int
    frame: int
    context: int
    stft: np.ndarray
    encoder: list[tuple[np.ndarray, np.ndarray, int]]
    lstm_w: np.ndarray
    lstm_r: np.ndarray
    lstm_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray


def _all_tensors(graph, out: dict) -> dict:
    """Initializers and Constant outputs of ``graph`` and every subgraph, by name."""
    import onnx
    from onnx import numpy_helper

    for init in graph.initializer:
        out[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
            if attr.type == onnx.AttributeProto.GRAPH:
                _all_tensors(attr.g, out)
    return out


def _torch_lstm_to_onnx(w: np.ndarray) -> np.ndarray:
    """Gate blocks from torch's (i, f, g, o) order to ONNX's (i, o, f, c) along axis 0."""
    i, f, g, o = np.split(w, 4, axis=0)
    return np.concatenate([i, o, f, g], axis=0)


def silero_weights(path: str | Path = NARROWBAND_VAD_MODEL) -> dict[int, SileroWeights]:
    """Both rate branches of Silero's frame graph (``silero_vad.onnx``), by sample rate."""
    import onnx

    model = onnx.load(str(path))
    tensors = _all_tensors(model.graph, {})
    branch_at = {}  # rate -> the If branch that runs for it
    top = next(n for n in model.graph.node if n.op_type == "If")
    equal = next(n for n in model.graph.node if n.op_type == "Equal" and n.output[0] == top.input[0])
    then_rate = int(tensors[next(i for i in equal.input if i != "sr")].reshape(-1)[0])
    for attr in top.attribute:
        is_then = attr.name == "then_branch"
        branch_at[then_rate if is_then else (8000 if then_rate == 16000 else 16000)] = attr.g
    weights = {}
    for rate, graph in branch_at.items():
        prefix = next(n.name for n in graph.node if n.name.endswith("/stft/Conv")).split("/stft/Conv")[0]
        convs = {n.name[len(prefix):]: n for n in graph.node if n.op_type == "Conv"}
        stft = tensors[convs["/stft/Conv"].input[1]]
        encoder = []
        for i in range(4):
            node = convs[f"/encoder/{i}/reparam_conv/Conv"]
            stride = next(a.ints[0] for a in node.attribute if a.name == "strides")
            pads = next(a.ints for a in node.attribute if a.name == "pads")
            if list(pads) != [1, 1]:
                raise ValueError(f"{path}: encoder {i} padding {list(pads)}, expected [1, 1]")
            encoder.append((tensors[node.input[1]], tensors[node.input[2]], int(stride)))
        out = convs["/decoder/decoder/2/Conv"]

        def rnn(name: str) -> np.ndarray:
            return tensors[prefix + "decoder.rnn." + name]

        b = np.concatenate([_torch_lstm_to_onnx(rnn("bias_ih")), _torch_lstm_to_onnx(rnn("bias_hh"))])
        frame, context = _FRAMES[rate]
        weights[rate] = SileroWeights(rate, frame, context, stft, encoder,
                                      _torch_lstm_to_onnx(rnn("weight_ih"))[None], _torch_lstm_to_onnx(rnn("weight_hh"))[None],
                                      b[None], tensors[out.input[1]], tensors[out.input[2]])
    return weights


def dense_conv(weight: np.ndarray, bias: np.ndarray, length: int, stride: int, pad: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """A 1-D convolution over ``length`` positions as one matrix on channel-last flattened features.

    Args:
        weight: (C_out, C_in, K) convolution weights.
        bias: (C_out,).
        length: input positions L_in.
        stride, pad: the convolution's stride and (symmetric, zero) padding.

    Returns:
        ``(D, b, L_out)``: D (L_in * C_in, L_out * C_out) and b (L_out * C_out,) such that
        ``x.reshape(N, L_in * C_in) @ D + b`` is the convolution of (N, L_in, C_in) ``x``, laid
        out as (N, L_out, C_out).
    """
    c_out, c_in, k = weight.shape
    l_out = (length + 2 * pad - k) // stride + 1
    dense = np.zeros((length, c_in, l_out, c_out), dtype=np.float32)
    for lo in range(l_out):
        for tap in range(k):
            li = lo * stride - pad + tap
            if 0 <= li < length:
                dense[li, :, lo, :] = weight[:, :, tap].T  # (C_in, C_out)
    return dense.reshape(length * c_in, l_out * c_out), np.tile(bias.astype(np.float32), l_out), l_out


def build_graph(w: SileroWeights):
    """The batched graph: ``input`` (B, F, frame + context), ``h``, ``c`` (1, B, H) -> ``speech_probs`` (B, F), ``hn``, ``cn``."""
    from onnx import TensorProto, helper, numpy_helper

    width = w.frame + w.context
    kernel = w.stft.shape[2]
    hop = kernel // 2
    pad = w.context  # Silero pads each block on the right by reflection, as much as its context
    if (width + pad) % hop:
        raise ValueError(f"rate {w.rate}: padded frame {width + pad} is not a whole number of {hop}-sample hops")
    hops = (width + pad) // hop
    windows = hops - 1
    bins = w.stft.shape[0] // 2
    hidden = w.lstm_r.shape[2]
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    shape = node("Shape", ["input"], "in_shape")
    bf = node("Slice", [shape, const("zero", np.array([0], np.int64)), const("two", np.array([2], np.int64))], "bf")
    x = node("Reshape", ["input", const("rows", np.array([-1, width], np.int64))], "frames")  # (N, width)
    x = node("Pad", [x, const("pads", np.array([0, 0, 0, pad], np.int64))], "padded", mode="reflect")  # (N, width + pad)
    x = node("Reshape", [x, const("hop_shape", np.array([-1, hops, hop], np.int64))], "hops")  # (N, hops, hop)
    axis1 = const("axis1", np.array([1], np.int64))
    first = node("Slice", [x, const("s0", np.array([0], np.int64)), const("e0", np.array([windows], np.int64)), axis1], "hop_a")
    second = node("Slice", [x, const("s1", np.array([1], np.int64)), const("e1", np.array([hops], np.int64)), axis1], "hop_b")
    x = node("Concat", [first, second], "windows", axis=2)  # (N, windows, kernel)
    spec = node("MatMul", [x, const("stft_basis", w.stft[:, 0, :].T.astype(np.float32))], "spec")  # (N, windows, 2 bins)
    axis2 = const("axis2", np.array([2], np.int64))
    re = node("Slice", [spec, const("re0", np.array([0], np.int64)), const("re1", np.array([bins], np.int64)), axis2], "re")
    im = node("Slice", [spec, const("im0", np.array([bins], np.int64)), const("im1", np.array([2 * bins], np.int64)), axis2], "im")
    power = node("Add", [node("Mul", [re, re], "re2"), node("Mul", [im, im], "im2")], "power")
    x = node("Sqrt", [power], "magnitude")  # (N, windows, bins)
    length, channels = windows, bins
    x = node("Reshape", [x, const("flat0", np.array([-1, length * channels], np.int64))], "enc_in")  # (N, L * C)
    for i, (weight, bias, stride) in enumerate(w.encoder):
        dense, b, length = dense_conv(weight, bias, length, stride)
        channels = weight.shape[0]
        x = node("MatMul", [x, const(f"enc{i}_w", dense)], f"enc{i}_mm")
        x = node("Relu", [node("Add", [x, const(f"enc{i}_b", b)], f"enc{i}_add")], f"enc{i}")  # (N, L_i * C_i)
    if length * channels != w.lstm_w.shape[2]:
        raise ValueError(f"rate {w.rate}: encoder gives {length}x{channels} features, the LSTM takes {w.lstm_w.shape[2]}")
    seq_shape = node("Concat", [bf, const("feat", np.array([length * channels], np.int64))], "seq_shape", axis=0)
    x = node("Reshape", [x, seq_shape], "bfc")  # (B, F, C)
    x = node("Transpose", [x], "fbc", perm=[1, 0, 2])  # (F, B, C)
    y = node("LSTM", [x, const("W", w.lstm_w.astype(np.float32)), const("R", w.lstm_r.astype(np.float32)),
                      const("B", w.lstm_b.astype(np.float32)), "", "h", "c"],
             ["lstm_y", "hn", "cn"], hidden_size=hidden)  # (F, 1, B, H)
    y = node("Relu", [node("Squeeze", [y, axis1], "lstm_fbh")], "dec_relu")  # (F, B, H)
    logit = node("Add", [node("MatMul", [y, const("out_w", w.out_w[:, :, 0].T.astype(np.float32))], "dec_mm"),
                         const("out_b", w.out_b.astype(np.float32))], "logit")  # (F, B, 1)
    p = node("Squeeze", [node("Sigmoid", [logit], "prob_fb1"), axis2], "prob_fb")  # (F, B)
    node("Transpose", [p], "speech_probs", perm=[1, 0])  # (B, F)

    graph = helper.make_graph(
        nodes, f"silero_vad_{w.rate // 1000}k_batched",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "frames", width]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", hidden]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, "batch", hidden])],
        [helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["batch", "frames"]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", hidden]),
         helper.make_tensor_value_info("cn", TensorProto.FLOAT, [1, "batch", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="spkserve.models.vad_graph")
    model.ir_version = 8
    model.doc_string = (f"Silero VAD (MIT licence, silero-vad 6.2.3 weights), {w.rate} Hz, rebuilt as batched "
                        "matrix multiplies by spkserve models/vad_graph.py")
    return model


def main(argv: list[str] | None = None) -> None:
    """Build the batched graphs from ``silero_vad.onnx`` and write them next to it."""
    import onnx

    ap = argparse.ArgumentParser(description="Rebuild Silero VAD as batched ONNX graphs (models/assets).")
    ap.add_argument("--source", type=Path, default=NARROWBAND_VAD_MODEL)
    ap.add_argument("--out-dir", type=Path, default=VAD_MODELS[16000].parent)
    args = ap.parse_args(argv)
    for rate, weights in sorted(silero_weights(args.source).items()):
        model = build_graph(weights)
        onnx.checker.check_model(model)
        path = args.out_dir / VAD_MODELS[rate].name
        path.write_bytes(model.SerializeToString())
        print(f"{path}: {rate} Hz, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
