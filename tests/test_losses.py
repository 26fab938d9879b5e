import torch

from kfdeploy.training.losses import distillation_loss, gaussian_kl, infomax_loss


def test_infomax_rewards_features_that_follow_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(64, 32)
    aligned = infomax_loss(teacher + 0.1 * torch.randn(64, 32), teacher)
    unrelated = infomax_loss(torch.randn(64, 32), teacher)
    assert aligned < unrelated - 0.5


def test_kl_is_zero_at_the_prior_and_grows_away_from_it():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert gaussian_kl(mu, logvar).item() == 0.0
    assert gaussian_kl(mu + 1.0, logvar).item() == 4.0  # 0.5 * 1^2 * 8 dims
    assert gaussian_kl(mu, logvar - 2.0).item() > 0


def test_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 5)
    assert abs(distillation_loss(logits, logits, 10.0).item()) < 1e-6
    assert distillation_loss(logits, logits.flip(1), 10.0).item() > 0
