"""The names of a training run folder's files, without TensorFlow: the trainer names them in its
flags' help, which it answers before TensorFlow loads. fcdn.training.run_folder writes them."""

SETTINGS_FILE = "run_settings.json"
TEST_LOSS_FILE = "test_loss.csv"
TEST_METRICS_FILE = "test_metrics.csv"
BEST_CHECKPOINT_DIR = "checkpoint"
SAVED_MODEL_DIR = "saved_model"
RESUME_DIR = "resume"
STATE_FILE = "state.json"
CKPT_PREFIX = "ckpt"
BIOIMAGEIO_PACKAGE = "model.bioimageio.zip"  # --export_bioimageio 1
CURVES_FILE = "training_curves.png"
PREDICTIONS_FILE = "test_predictions.png"
