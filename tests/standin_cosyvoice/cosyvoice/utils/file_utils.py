"""Stand-in of cosyvoice/utils/file_utils.py: root logging at DEBUG on import, and a load_wav that fails like
torchaudio >= 2.9 without torchcodec."""
import logging

logging.getLogger('matplotlib').setLevel(logging.WARNING)
logging.basicConfig(level=logging.DEBUG,
                    format='%(asctime)s %(levelname)s %(message)s')


def load_wav(wav, target_sr, min_sr=16000):
    raise RuntimeError('TorchCodec is required for load_with_torchcodec. Please install torchcodec to use this function.')
