"""Wyoming protocol text-to-speech server for CosyVoice voice cloning."""

__version__ = "0.1.0"
