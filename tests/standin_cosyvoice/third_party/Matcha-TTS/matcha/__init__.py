"""Stand-in for the Matcha-TTS submodule: the real cosyvoice imports `matcha` from third_party/Matcha-TTS."""
