"""onnxruntime's blocked (NCHWc) convolutions for convolutions whose kernel is computed.

onnxruntime's CPU provider runs a ``Conv`` fast only when its kernel is a constant: at load it
rewrites such convs into its own ``com.microsoft.nchwc`` ``Conv`` with the kernel reordered
into channel blocks. A ``Conv`` whose kernel is computed per call (a CondConv layer exported
for a fixed batch: the kernel mixing feeds the conv) keeps the generic path, an im2col and a
GEMM per group: for depthwise convs one channel at a time, 7-10x slower than the blocked kernel
(``benchmarks/NOTES.md``). The blocked kernel itself takes any kernel tensor, computed or not,
as long as it is in the blocked layout.

:func:`rewrite_computed_convs` therefore replaces each such ``Conv`` by ``ReorderInput`` ->
blocked ``Conv`` -> ``ReorderOutput``, with the computed kernel reordered in the graph:

* depthwise (``Cin / groups == 1``, ``Cout == groups``): kernel ``(C, 1, kh, kw)`` to
  ``(C/b, kh, kw, b)`` (onnxruntime's ``OIHWBo`` layout);
* ``groups == 1``: kernel ``(Cout, Cin, kh, kw)`` to ``(Cout/b, Cin/b, kh, kw, b_in, b_out)``
  (``OIHWBiBo``);

* grouped, where the kernel is computed as ``Reshape(Transpose(source))`` (deployed DGC at a
  static batch of 1, exported under :class:`~dynaconv.layers.dgc.deployed.nchwc_export`):
  ``OIHWBiBo`` per group, the reorder composed with that ``Transpose`` into one (or none
  when ``source`` is already blocked);

all stored back in the kernel's shape; the channel counts (per group) must be multiples of
the block size ``b`` (other convs are left as they are). onnxruntime does not carry its own blocked
layout through these nodes, so by default (``chain=True``) the tensors between rewritten convs
stay blocked: activations, residual additions and squeeze-excite's mean and scale run on the
blocked tensors, and a ``ReorderInput`` or ``ReorderOutput`` remains only where a plain operator
reads them (:func:`_chain_blocked`). The result is exact (the same kernel, the same sums, up
to float rounding where the spatial means and residual additions sum in another order) but
**specific to onnxruntime's CPU provider on x86 processors with the same block size** (16
with AVX-512, 8 with AVX2): the graph uses onnxruntime's internal operators, as the models
onnxruntime itself saves after optimising for the machine it runs on. Keep the portable file
for other runtimes and processors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["nchwc_block_size", "rewrite_computed_convs", "write_nchwc"]

#: The domain of onnxruntime's blocked-layout operators.
NCHWC_DOMAIN = "com.microsoft.nchwc"


def nchwc_block_size() -> int:
    """The channel block of the installed onnxruntime's NCHWc kernels on this CPU, or 0 when it
    has none (then onnxruntime does not reorder a depthwise conv with a constant kernel).

    Read from onnxruntime itself: the optimised form of a 4-channel depthwise conv holds its
    kernel padded to one block.
    """
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    channels = 4
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((channels, 1, 3, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3  # the "hardware specific" warning is the point here
        onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        optimized = onnx.load(options.optimized_model_filepath)
    if not any(node.domain == NCHWC_DOMAIN for node in optimized.graph.node):
        return 0
    return int(optimized.graph.initializer[0].dims[0])


def _check_block(block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (the NCHWc block size), got {block!r}")
    return block


def rewrite_computed_convs(model: Any, block: int, *, chain: bool = True) -> tuple[Any, int]:
    """``(rewritten model, number of convs rewritten)``: every ``Conv`` of ``model`` (an
    ``onnx.ModelProto``, not modified) whose kernel is not a constant, depthwise, with
    ``groups == 1`` or grouped with a kernel that is a transposed tensor (module docstring),
    and whose channel counts are multiples of ``block``, runs onnxruntime's
    blocked conv (module docstring). ``block``: :func:`nchwc_block_size` of the target
    machine (``ValueError`` unless a positive int). ``chain``: keep tensors in the blocked
    layout between the rewritten convs (:func:`_chain_blocked`); False leaves every rewritten
    conv between its own ``ReorderInput`` and ``ReorderOutput``.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    block = _check_block(block)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    shapes = {
        info.name: [d.dim_value if d.HasField("dim_value") else None for d in dims.dim]
        for info in (*graph.value_info, *graph.input, *graph.output)
        if info.type.tensor_type.HasField("shape")
        for dims in [info.type.tensor_type.shape]
    }
    nodes: list[Any] = []
    count = 0
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        layout = _blocked_layout(node, constants, shapes, block)
        folded = None
        if layout is not None:
            folded = _folded_transpose(node.input[1], *layout[:2], producers, consumers, shapes)
        if layout is None or (len(layout[1]) == 7 and folded is None):
            # grouped convs (not depthwise) only where the kernel is a transpose already (DGC
            # exported under nchwc_export): others are not measured
            nodes.append(node)
            continue
        count += 1
        prefix = f"nchwc_{count}_"
        blocked_shape, perm, kernel_shape = layout
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = kernel_shape[2:]
        mixing = _mixing_product(node.input[1], producers, consumers, initializers)
        if mixing is not None and _examples(mixing[1], kernel_shape, perm, block) is not None:
            examples = _examples(mixing[1], kernel_shape, perm, block)
            # reorder the expert bank's columns once: the mixing then writes the blocked kernel
            product, bank = mixing
            split = [blocked_shape[0] // examples, *blocked_shape[1:]]
            order = np.arange(bank.shape[1]).reshape(split).transpose(perm).reshape(-1)
            bank = bank[:, order]
            weight = node.input[1]
            if examples == 1 and kernel_shape[3] == 1:  # the product in the kernel's shape
                weight = prefix + "w"
                nodes += _mixing_by_column(product, bank, prefix, graph, kernel_shape, weight)
            elif examples == 1:  # the bank as (numel, E) times r as a column: read faster
                nodes += _mixing_by_column(product, bank, prefix, graph)
            else:
                graph.initializer.append(
                    numpy_helper.from_array(np.ascontiguousarray(bank), prefix + "bank")
                )
                product.input[1] = prefix + "bank"
        elif folded is not None:  # the kernel is a transpose already: compose the two
            source, composed = folded
            graph.initializer.append(
                numpy_helper.from_array(np.array(kernel_shape, np.int64), prefix + "shape")
            )
            weight = prefix + "w"
            if composed != sorted(composed):  # else the source is in the blocked layout
                nodes.append(
                    helper.make_node("Transpose", [source], [prefix + "w2"], perm=composed)
                )
                source = prefix + "w2"
            nodes.append(helper.make_node("Reshape", [source, prefix + "shape"], [weight]))
        else:  # reorder the computed kernel in the graph
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(blocked_shape, np.int64), prefix + "blocks"),
                    numpy_helper.from_array(np.array(kernel_shape, np.int64), prefix + "shape"),
                ]
            )
            weight = prefix + "w"
            nodes += [
                helper.make_node("Reshape", [node.input[1], prefix + "blocks"], [prefix + "w1"]),
                helper.make_node("Transpose", [prefix + "w1"], [prefix + "w2"], perm=perm),
                helper.make_node("Reshape", [prefix + "w2", prefix + "shape"], [weight]),
            ]
        nodes += [
            helper.make_node("ReorderInput", [node.input[0]], [prefix + "x"], domain=NCHWC_DOMAIN),
            helper.make_node(
                "Conv",
                [prefix + "x", weight, *node.input[2:]],
                [prefix + "y"],
                domain=NCHWC_DOMAIN,
                group=attributes.get("group", 1),
                kernel_shape=kernel,
                pads=attributes.get("pads", [0] * 4),
                strides=attributes.get("strides", [1, 1]),
                dilations=attributes.get("dilations", [1, 1]),
            ),
            helper.make_node(
                "ReorderOutput",
                [prefix + "y"],
                [node.output[0]],
                domain=NCHWC_DOMAIN,
                channels=kernel_shape[0],
            ),
        ]
    nodes = _topological_order(_drop_unread(nodes, graph), graph)
    if chain and count:
        nodes = _topological_order(_chain_blocked(nodes, graph, shapes, block), graph)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    if count and not any(op.domain == NCHWC_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
    return model, count


def _mixing_product(
    kernel: str, producers: dict[str, Any], consumers: dict[str, int], initializers: dict[str, Any]
) -> tuple[Any, Any] | None:
    """``(MatMul node, expert bank (E, numel) as an array)`` when the kernel ``kernel`` is
    ``r @ bank`` reshaped (only ``Reshape`` nodes between, each output read once; the bank an
    initializer, possibly reshaped), else None."""
    from onnx import numpy_helper

    name = kernel
    while True:
        node = producers.get(name)
        if node is None or consumers.get(name, 0) != 1:
            return None
        if node.op_type == "MatMul":
            break
        if node.op_type != "Reshape":
            return None
        name = node.input[0]
    source = node.input[1]
    reshape = producers.get(source)
    if source not in initializers and reshape is not None and reshape.op_type == "Reshape":
        source = reshape.input[0]
    if source not in initializers:
        return None
    bank = numpy_helper.to_array(initializers[source])
    return node, bank.reshape(bank.shape[0], -1)


def _examples(bank: Any, kernel_shape: list[int], perm: list[int], block: int) -> int | None:
    """How many examples' kernels the conv's kernel holds (a fixed batch ``B`` folds them into
    ``B * C`` depthwise channels), or None when the bank's columns cannot be reordered per
    example (sizes that do not divide, or several examples in a ``groups == 1`` kernel)."""
    numel = 1
    for size in kernel_shape:
        numel *= size
    examples, rest = divmod(numel, bank.shape[1])
    if examples < 1 or rest or kernel_shape[0] % examples:
        return None
    if examples > 1 and len(perm) != 5:  # only depthwise kernels hold several examples
        return None
    return examples if (kernel_shape[0] // examples) % block == 0 else None


def _mixing_by_column(
    product: Any,
    bank: Any,
    prefix: str,
    graph: Any,
    kernel_shape: list[int] | None = None,
    kernel: str | None = None,
) -> list[Any]:
    """Turn ``product`` (``r @ bank``, ``r``: ``(1, E)``) into ``bank.T @ r.T`` reshaped to
    ``(1, numel)``: the same sums; onnxruntime reads a ``(numel, E)`` constant by rows faster
    than its packed ``(E, numel)`` operand (``benchmarks/NOTES.md``). Returns the nodes that
    compute ``r.T`` and reshape the product (to be placed around ``product``, which is rewired
    in place). With ``kernel_shape`` (its last size 1) and ``kernel``, the product is instead
    written as ``kernel`` in that shape, ``bank.T`` held as ``(*kernel_shape[:3], E)`` (one
    GEMM all the same: onnxruntime folds the leading sizes of a product by a matrix), and the
    reshapes between ``product`` and the conv are left unread."""
    import numpy as np
    from onnx import helper, numpy_helper

    experts, numel = bank.shape
    bank_t = np.ascontiguousarray(bank.T)
    if kernel_shape is not None:
        bank_t = bank_t.reshape(*kernel_shape[:3], experts)
    graph.initializer.extend(
        [
            numpy_helper.from_array(bank_t, prefix + "bank_t"),
            numpy_helper.from_array(np.array([experts, 1], np.int64), prefix + "column"),
        ]
    )
    routing, output = product.input[0], product.output[0]
    column = helper.make_node("Reshape", [routing, prefix + "column"], [prefix + "r_t"])
    del product.input[:]
    product.input.extend([prefix + "bank_t", prefix + "r_t"])
    if kernel is not None:
        product.output[0] = kernel
        return [column]
    graph.initializer.append(
        numpy_helper.from_array(np.array([1, numel], np.int64), prefix + "row")
    )
    product.output[0] = prefix + "mixed_t"
    row = helper.make_node("Reshape", [prefix + "mixed_t", prefix + "row"], [output])
    return [column, row]


def _topological_order(nodes: list[Any], graph: Any) -> list[Any]:
    """``nodes`` in an order where each node follows the producers of its inputs (stable:
    nodes keep their relative order where they can)."""
    ready = {init.name for init in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(nodes), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("the graph has a cycle or an input that nothing produces")
        pending = waiting
    return ordered


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {output.name for output in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _blocked_layout(
    node: Any, constants: set[str], shapes: dict[str, list[int | None]], block: int
) -> tuple[list[int], list[int], list[int]] | None:
    """``(split shape, permutation, kernel shape)`` that reorder ``node``'s kernel into the
    blocked layout, or None when the node is not a ``Conv`` with a computed kernel that the
    blocked conv runs (known 2-D kernel shape, channels in whole blocks, no ``auto_pad``)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.input[1] in constants:
        return None
    attributes = {a.name: a for a in node.attribute}
    if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"", b"NOTSET"):
        return None
    shape = shapes.get(node.input[1])
    if shape is None or len(shape) != 4 or any(d is None or d < 1 for d in shape):
        return None
    cout, cin_per_group, kh, kw = shape
    groups = attributes["group"].i if "group" in attributes else 1
    if cout % block:
        return None
    if cin_per_group == 1 and groups == cout:  # depthwise: OIHWBo
        return [cout // block, block, 1, kh, kw], [0, 2, 3, 4, 1], shape
    if groups == 1 and cin_per_group % block == 0:  # OIHWBiBo
        split = [cout // block, block, cin_per_group // block, block, kh, kw]
        return split, [0, 2, 4, 5, 3, 1], shape
    if cin_per_group % block == 0 and (cout // groups) % block == 0:  # OIHWBiBo per group
        split = [groups, cout // groups // block, block, cin_per_group // block, block, kh, kw]
        return split, [0, 1, 3, 5, 6, 4, 2], shape
    return None


def _folded_transpose(
    kernel: str,
    split: list[int],
    perm: list[int],
    producers: dict[str, Any],
    consumers: dict[str, int],
    shapes: dict[str, list[int | None]],
) -> tuple[str, list[int]] | None:
    """``(source, permutation)`` when the kernel ``kernel`` is ``Reshape(Transpose(source))``
    (each output read once) and the ``Transpose``'s result has the shape ``split``: then the
    blocked kernel is one ``Transpose`` of ``source`` (the two permutations composed) instead
    of a second reordering copy. Else None."""
    reshape = producers.get(kernel)
    if reshape is None or reshape.op_type != "Reshape" or consumers.get(kernel, 0) != 1:
        return None
    transpose = producers.get(reshape.input[0])
    if transpose is None or transpose.op_type != "Transpose":
        return None
    if consumers.get(reshape.input[0], 0) != 1 or shapes.get(reshape.input[0]) != split:
        return None
    inner = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    if inner is None or len(inner) != len(perm):
        return None
    return transpose.input[0], [inner[axis] for axis in perm]


def write_nchwc(
    source: str | Path, target: str | Path, block: int | None = None, *, chain: bool = True
) -> int:
    """Read the ONNX file ``source``, write :func:`rewrite_computed_convs` of it to ``target``
    and return the number of convs rewritten. ``block`` defaults to :func:`nchwc_block_size`
    of this machine; ``ValueError`` when onnxruntime has no NCHWc kernels here and no
    ``block`` is given. ``chain``: as in :func:`rewrite_computed_convs`."""
    import onnx

    if block is None:
        block = nchwc_block_size()
        if block == 0:
            raise ValueError(
                "block: onnxruntime has no NCHWc kernels on this CPU (they exist on x86 "
                "processors with AVX2 or AVX-512); pass the target machine's block size"
            )
    model, count = rewrite_computed_convs(onnx.load(str(source)), block, chain=chain)
    onnx.save(model, str(target))
    return count


#: Element-wise operators with one input (and attributes only): they run on a blocked tensor
#: as on the plain one, channel for channel.
_UNARY = frozenset(
    {"Sigmoid", "Relu", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Softplus"}
)
#: Element-wise operators with two inputs of one shape.
_BINARY = frozenset({"Add", "Mul", "Sub", "Div"})


def _chain_blocked(
    nodes: list[Any],
    graph: Any,
    shapes: dict[str, list[int | None]],
    block: int,
) -> list[Any]:
    """Keep tensors in the blocked layout between the rewritten convs: ``nodes`` (in
    topological order, each rewritten conv between ``ReorderInput`` and ``ReorderOutput``)
    with these forms of the operators that read a ``ReorderOutput``'s result (or a tensor
    computed from one by the forms below):

    * ``ReorderInput`` of it: dropped, its readers take the blocked tensor;
    * a ``Reshape`` to the same shape: the blocked tensor is its blocked form;
    * element-wise operators (``_UNARY``; ``_BINARY`` with both inputs blocked, of one
      shape): the same operator on the blocked tensors (the blocked layout only permutes
      elements: channel counts are whole blocks, no padding);
    * ``Mul`` by a per-channel ``(N or 1, C, 1, 1)`` tensor (squeeze-excite), the blocked
      layout of a ``(., C, 1, 1)`` tensor being its plain one: with one scale for all examples,
      a blocked depthwise 1x1 conv whose kernel is the scale (one vectorised pass); else both
      viewed as ``(N, C/b, H, W, b)`` and ``(N, C/b, 1, 1, b)`` (onnxruntime's broadcast is
      slower there: 16-element rows);
    * ``ReduceMean`` over the spatial axes: the blocked ``GlobalAveragePool`` and a
      ``ReorderOutput`` of its ``(N, C, 1, 1)`` result (reshaped to ``(N, C)`` without
      ``keepdims``);
    * ``Add`` of a rewritten conv's output (read by nothing else) and another blocked tensor:
      the blocked conv's ``Sum`` input.

    A ``ReorderInput`` of a plain tensor also gives later readers of that tensor (or of a
    same-shape ``Reshape`` of it) its blocked form. Every other reader keeps the plain tensor,
    reordered out of the blocked form when it has one (not computed twice); operators nothing
    reads any more are dropped. The result computes the same values (element-wise operators
    on permuted elements; the residual ``Sum`` adds the same terms)."""
    import numpy as np
    from onnx import NodeProto, helper, numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in nodes:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def known(name: str) -> list[int] | None:
        shape = shapes.get(name)
        if shape is None or any(d is None or d < 1 for d in shape):
            return None
        return [int(d) for d in shape]

    def constant(values_: np.ndarray, name: str) -> str:
        graph.initializer.append(numpy_helper.from_array(values_, name))
        return name

    blocked: dict[str, str] = {}  # plain tensor -> the same tensor in the blocked layout
    rename: dict[str, str] = {}  # output of a dropped ReorderInput -> the blocked tensor
    sums: list[NodeProto] = []  # blocked Adds that may become a conv's Sum input
    plain_forms: list[NodeProto] = []  # operators with a blocked form
    same: dict[str, str] = {}  # output of a Reshape to the same shape -> the reshaped tensor
    kept: list[NodeProto] = []
    for index, node in enumerate(nodes):
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        op, inputs = node.op_type, list(node.input)
        if (
            op == "Reshape"
            and node.domain in ("", "ai.onnx")
            and inputs[0] not in blocked
            and known(inputs[0]) is not None
            and known(inputs[0]) == known(node.output[0])
        ):
            same[node.output[0]] = same.get(inputs[0], inputs[0])
        if node.domain == NCHWC_DOMAIN:
            if op == "ReorderInput" and inputs[0] in blocked:
                rename[node.output[0]] = blocked[inputs[0]]
                continue
            if op == "ReorderInput":  # later readers of the plain tensor may take this one
                blocked.setdefault(same.get(inputs[0], inputs[0]), node.output[0])
                blocked.setdefault(inputs[0], node.output[0])
            if op == "ReorderOutput":
                blocked[node.output[0]] = inputs[0]
            kept.append(node)
            continue
        if node.domain not in ("", "ai.onnx") or not any(n in blocked for n in inputs):
            kept.append(node)
            continue
        kept.append(node)  # the plain form stays for other readers (dropped when unread)
        result, prefix = node.output[0], f"chain_{index}_"
        plain_forms.append(node)
        shape = known(inputs[0])
        if op == "Reshape" and shape is not None and known(result) == shape:
            blocked[result] = blocked[inputs[0]]
        elif op in _UNARY and len(inputs) == 1:
            twin = NodeProto()
            twin.CopyFrom(node)
            twin.name, twin.input[0], twin.output[0] = "", blocked[inputs[0]], prefix + "y"
            kept.append(twin)
            blocked[result] = prefix + "y"
        elif op in _BINARY and len(inputs) == 2 and all(n in blocked for n in inputs):
            if shape is None or known(inputs[1]) != shape or known(result) != shape:
                continue
            twin = helper.make_node(op, [blocked[n] for n in inputs], [prefix + "y"])
            kept.append(twin)
            blocked[result] = prefix + "y"
            if op == "Add":
                sums.append(twin)
        elif op == "Mul" and len(inputs) == 2:
            side = 0 if inputs[0] in blocked else 1
            plain, scale = inputs[side], inputs[1 - side]
            shape, factor = known(plain), known(scale)
            if shape is None or factor is None or len(shape) != 4 or shape[1] % block:
                continue
            n, c, h, w = shape
            if factor[1:] != [c, 1, 1] or factor[0] not in (1, n) or known(result) != shape:
                continue
            if factor[0] == 1:  # a depthwise 1x1 conv: (C, 1, 1, 1) is its own blocked layout
                kept += [
                    helper.make_node(
                        "Reshape",
                        [scale, constant(np.array([c, 1, 1, 1]), prefix + "w4")],
                        [prefix + "w"],
                    ),
                    helper.make_node(
                        "Conv",
                        [blocked[plain], prefix + "w"],
                        [prefix + "y"],
                        domain=NCHWC_DOMAIN,
                        group=c,
                        kernel_shape=[1, 1],
                        pads=[0, 0, 0, 0],
                        strides=[1, 1],
                        dilations=[1, 1],
                    ),
                ]
            else:  # per example: (N, C/b, H, W, b) times (N, C/b, 1, 1, b)
                split = np.array([n, c // block, h, w, block])
                kept += [
                    helper.make_node(
                        "Reshape", [blocked[plain], constant(split, prefix + "x5")], [prefix + "x"]
                    ),
                    helper.make_node(
                        "Reshape",
                        [scale, constant(np.array([n, c // block, 1, 1, block]), prefix + "s5")],
                        [prefix + "s"],
                    ),
                    helper.make_node("Mul", [prefix + "x", prefix + "s"], [prefix + "m"]),
                    helper.make_node(
                        "Reshape",
                        [prefix + "m", constant(np.array(shape), prefix + "x4")],
                        [prefix + "y"],
                    ),
                ]
            blocked[result] = prefix + "y"
        elif op == "ReduceMean" and shape is not None and len(shape) == 4:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            axes = attributes.get("axes")
            if axes is None and len(inputs) > 1 and inputs[1] in values:
                axes = values[inputs[1]].tolist()
            if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
                continue
            kept.pop()  # replaced: the pooled result is small, back in the plain layout
            pooled = result if attributes.get("keepdims", 1) else prefix + "pooled"
            kept += [
                helper.make_node(
                    "GlobalAveragePool", [blocked[inputs[0]]], [prefix + "p"], domain=NCHWC_DOMAIN
                ),
                helper.make_node(
                    "ReorderOutput",
                    [prefix + "p"],
                    [pooled],
                    domain=NCHWC_DOMAIN,
                    channels=shape[1],
                ),
            ]
            if pooled != result:
                flat = constant(np.array(shape[:2]), prefix + "flat")
                kept.append(helper.make_node("Reshape", [pooled, flat], [result]))
    # a plain result still read (a graph output, an operator left as it was) whose blocked form
    # is read too is reordered out of the blocked form rather than computed again from plain
    # inputs (when only plain operators read it, the plain operator stays and its blocked
    # form goes)
    kept = _drop_unread(kept, graph)
    produced = {name for node in kept for name in node.output}
    for node in plain_forms:
        result, shape = node.output[0], known(node.output[0])
        if node.op_type == "Reshape" or result not in blocked or shape is None:
            continue
        if blocked[result] not in produced or not any(n is node for n in kept):
            continue
        reorder = helper.make_node(
            "ReorderOutput", [blocked[result]], [result], domain=NCHWC_DOMAIN, channels=shape[1]
        )
        kept[next(i for i, kept_node in enumerate(kept) if kept_node is node)] = reorder
    kept = _drop_unread(kept, graph)
    return _fuse_sums(kept, sums, graph)


def _drop_unread(nodes: list[Any], graph: Any) -> list[Any]:
    """``nodes`` without those whose outputs nothing reads (repeatedly)."""
    outputs = {output.name for output in graph.output}
    while True:
        read = outputs | {name for node in nodes for name in node.input}
        kept = [node for node in nodes if any(name in read for name in node.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _fuse_sums(nodes: list[Any], sums: list[Any], graph: Any) -> list[Any]:
    """Turn each blocked ``Add`` of ``sums`` still in ``nodes`` into the ``Sum`` input of the
    blocked conv that computes one of its terms, when nothing else reads that conv's output
    and the conv has no activation (onnxruntime adds ``Sum`` to the conv's result)."""
    outputs = {output.name for output in graph.output}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producers = {output: node for node in nodes for output in node.output}
    dropped = set()
    for add in sums:
        if not any(node is add for node in nodes):
            continue
        for side in (0, 1):
            conv = producers.get(add.input[side])
            if (
                conv is None
                or conv.domain != NCHWC_DOMAIN
                or conv.op_type != "Conv"
                or len(conv.input) > 3
                or any(a.name == "activation" for a in conv.attribute)
                or readers.get(add.input[side], 0) != 1
                or add.input[side] in outputs
            ):
                continue
            other = add.input[1 - side]
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input.append(other)
            conv.output[0] = add.output[0]
            dropped.add(id(add))
            break
    return [node for node in nodes if id(node) not in dropped]
