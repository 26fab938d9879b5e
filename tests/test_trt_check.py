import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from kfdeploy.bundling.trt_check import TRT_OPSET_RANGE, TRT_SUPPORTED_OPS, TrtIssue, check_file, check_model


class TinyNet(nn.Module):
    """The layer kinds of our trunk and task modules, at toy size: image (N, 1, 16, 16) -> 3 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 16 * 16, 3)

    def forward(self, image):
        return self.head(self.features(image))


def export_tiny_net(path, opset=20):
    """Export TinyNet as kfdeploy exports its modules: dynamo, batch dynamic, nothing else."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        model, (torch.rand(2, 1, 16, 16),), str(path), dynamo=True, external_data=False, opset_version=opset,
        input_names=["image"], output_names=["logits"], dynamic_shapes=[{0: batch}], verbose=False,
    )
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt_check") / "tiny.onnx"
    export_tiny_net(path)
    return path


def _tensor(name, elem_type=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, elem_type, shape)


def _model(nodes, inputs=None, outputs=None, opset=20, initializers=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs or [_tensor("x")], outputs or [_tensor("y")], list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _only(issues):
    assert len(issues) == 1, issues
    return issues[0]


def test_exported_conv_net_is_within_what_tensorrt_parses(exported):
    model = onnx.load(str(exported))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the export should have a dynamic batch"
    assert check_file(exported) == []


def test_the_list_and_range_are_those_of_tensorrt_10():
    assert {"Conv", "BatchNormalization", "Relu", "Gemm", "MatMul", "Reshape", "Flatten"} <= TRT_SUPPORTED_OPS
    assert not {"Unique", "StringNormalizer", "SequenceAt", "Bernoulli"} & TRT_SUPPORTED_OPS
    assert TRT_OPSET_RANGE == (9, 24)


def test_a_well_formed_hand_built_graph_has_no_issues():
    assert check_model(_model([helper.make_node("Relu", ["x"], ["y"], name="act")])) == []


def test_custom_domain_op_is_reported():
    node = helper.make_node("FancyNorm", ["x"], ["y"], name="norm", domain="com.example")
    issue = _only(check_model(_model([node], extra_opsets=["com.example"])))
    assert issue.where == "node norm (com.example::FancyNorm)"
    assert "custom domain 'com.example'" in issue.problem and "plugin" in issue.problem


def test_standard_op_the_parser_lacks_is_reported():
    node = helper.make_node("Unique", ["x"], ["y"], name="dedupe")
    issue = _only(check_model(_model([node])))
    assert issue == TrtIssue("node dedupe (Unique)", issue.problem)
    assert "Unique is not supported" in issue.problem


def test_unnamed_nodes_are_reported_by_position():
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Unique", ["h"], ["y"])]
    assert _only(check_model(_model(nodes))).where == "node #1 (Unique)"


def test_op_inside_an_if_branch_is_reported():
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["z"], name="inner")], "then", [], [_tensor("z")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [], [_tensor("z")])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch, else_branch=other)
    model = _model([node], inputs=[_tensor("x"), _tensor("c", TensorProto.BOOL, [])])
    assert _only(check_model(model)).where == "node inner (Unique) in then_branch of node branch (If)"


def test_local_functions_are_checked_by_their_body_not_their_call():
    def function(op):
        return helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node(op, ["a"], ["b"], name="body")],
                                    [helper.make_opsetid("", 20)])

    call = helper.make_node("Block", ["x"], ["y"], name="call", domain="local")
    assert check_model(_model([call], functions=[function("Relu")], extra_opsets=["local"])) == []
    issue = _only(check_model(_model([call], functions=[function("Unique")], extra_opsets=["local"])))
    assert "Unique is not supported" in issue.problem


@pytest.mark.parametrize("opset", [TRT_OPSET_RANGE[0] - 1, TRT_OPSET_RANGE[1] + 1])
def test_opset_out_of_range_is_reported(opset):
    issue = _only(check_model(_model([helper.make_node("Relu", ["x"], ["y"])], opset=opset)))
    assert issue.where == "model"
    assert f"opset {opset} is outside the 9-24" in issue.problem and "opset_version" in issue.problem


def test_dynamic_non_batch_dimension_is_reported():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], inputs=[_tensor("x", shape=["batch", "width"])])
    issue = _only(check_model(model))
    assert issue.where == "input x dim 1"
    assert "dynamic ('width')" in issue.problem and "static" in issue.problem


def test_dimension_without_value_or_name_counts_as_dynamic_and_unknown_rank_is_reported():
    nameless = _tensor("x", shape=["batch", None])
    no_rank = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    issues = check_model(_model([helper.make_node("Relu", ["x"], ["y"])], inputs=[nameless], outputs=[no_rank]))
    assert [i.where for i in issues] == ["input x dim 1", "output y"]
    assert "unknown rank" in issues[1].problem


def test_a_real_export_made_dynamic_beyond_the_batch_is_reported(exported):
    model = onnx.load(str(exported))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    assert _only(check_model(model)).where == "input image dim 2"


def test_double_input_is_reported():
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], inputs=[_tensor("x", TensorProto.DOUBLE)])
    issue = _only(check_model(model))
    assert issue.where == "input x"
    assert "DOUBLE" in issue.problem and "FLOAT" in issue.problem


def test_refused_types_of_outputs_and_initializers_are_reported():
    weights = helper.make_tensor("w", TensorProto.COMPLEX64, [1], [1 + 2j])
    model = _model([helper.make_node("Identity", ["x"], ["y"])], outputs=[_tensor("y", TensorProto.STRING)],
                   initializers=[weights])
    issues = check_model(model)
    assert [i.where for i in issues] == ["output y", "initializer w"]
    assert "STRING" in issues[0].problem and "COMPLEX64" in issues[1].problem


def test_quantized_weights_are_accepted():
    weights = helper.make_tensor("w", TensorProto.INT8, [4], [1, 2, 3, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["d"])
    add = helper.make_node("Add", ["x", "d"], ["y"])
    assert check_model(_model([node, add], initializers=[weights, scale])) == []
