"""Inline chosen branches of ``If`` nodes into the main graph.

Matches the ``If`` nodes of the main graph named in ``choices`` and replaces each by the nodes of the
branch chosen for it (``then_branch`` for True, ``else_branch`` for False): the branch's initializers join
the main graph's, the tensors that leave the branch take the names of the ``If``'s outputs, and a branch
output computed outside the branch is passed on by an ``Identity``.

Guarantees: the result computes the same outputs as the original whenever the conditions take the chosen
values, and every tensor computed inside an inlined branch keeps its name, so it can be made a graph
output (calibration reads activations of the merged decoder's prefill branch this way). The input model
is not changed.
"""

from __future__ import annotations

import onnx

BRANCHES = {True: "then_branch", False: "else_branch"}


def inline_branches(model: onnx.ModelProto, choices: dict[str, bool]) -> onnx.ModelProto:
    """A copy of ``model`` with each main-graph ``If`` named in ``choices`` replaced by its chosen branch."""
    inlined = onnx.ModelProto()
    inlined.CopyFrom(model)
    graph = inlined.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "If" or node.name not in choices:
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == BRANCHES[choices[node.name]])
        produced = {out for inner in branch.node for out in inner.output}
        rename = {
            value.name: outer
            for value, outer in zip(branch.output, node.output, strict=True)
            if value.name in produced and outer
        }
        graph.initializer.extend(branch.initializer)
        for inner in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.input[:] = [rename.get(name, name) for name in inner.input]
            copy.output[:] = [rename.get(name, name) for name in inner.output]
            copy.name = f"{node.name}/{copy.name}"
            nodes.append(copy)
        for value, outer in zip(branch.output, node.output, strict=True):
            if outer and value.name not in rename:
                nodes.append(onnx.helper.make_node("Identity", [value.name], [outer], name=f"{node.name}/{outer}"))
    del graph.node[:]
    graph.node.extend(nodes)
    return inlined
