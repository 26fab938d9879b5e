import torch

from kfdeploy.training.data import TASK_CLASSES, SpritesSource
from kfdeploy.training.models import FactorConfig, FactorNet, SpritesTeacher, TeacherConfig, count_parameters


def _pair():
    torch.manual_seed(0)
    teacher = SpritesTeacher(TeacherConfig(dict(TASK_CLASSES))).eval()
    student = FactorNet(FactorConfig(dict(TASK_CLASSES))).eval()
    return teacher, student


def test_warm_started_factor_network_answers_exactly_as_the_teacher_at_step_zero():
    teacher, student = _pair()
    assert student.warm_start_from(teacher)
    images, _ = SpritesSource().batch(0, 16)
    with torch.no_grad():
        expected, got = teacher(images), student(images)
    for task in TASK_CLASSES:
        torch.testing.assert_close(got[task], expected[task])


def test_warm_start_refuses_a_teacher_of_another_architecture():
    _, student = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert not student.warm_start_from(torch.nn.Linear(3, 3))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_batch_of_one_gets_the_same_answer_as_inside_a_batch():
    _, student = _pair()
    torch.nn.init.normal_(student.tasks["shape"].tsn.fc[-1].weight, std=0.1)  # a non-zero code
    images, _ = SpritesSource().batch(0, 8)
    with torch.no_grad():
        together = student(images)["shape"]
        alone = torch.cat([student(images[i : i + 1])["shape"] for i in range(8)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_task_modules_are_much_smaller_than_the_trunk():
    _, student = _pair()
    trunk = count_parameters(student.trunk)
    for module in student.tasks.values():
        assert count_parameters(module.tsn) < trunk / 2


def test_a_frozen_trunk_stays_frozen_whatever_its_holder_is_told():
    import copy
    import pickle

    from kfdeploy.training.models import freeze
    from kfdeploy.training.train import accuracy

    student = FactorNet(FactorConfig({"shape": 3}))
    keys = list(student.state_dict())
    freeze(student.trunk)
    images, labels = SpritesSource(tasks=["shape"]).heldout(8)
    for net in (student, copy.deepcopy(student), pickle.loads(pickle.dumps(student))):
        net.requires_grad_(True)
        net.train()
        accuracy(net, images, labels)  # hands the model back with train(was_training)
        assert net.training and net.tasks.training
        assert not any(m.training for m in net.trunk.modules())
        assert not any(p.requires_grad for p in net.trunk.parameters())
        assert list(net.state_dict()) == keys, "bundles fingerprint the trunk by these keys"
