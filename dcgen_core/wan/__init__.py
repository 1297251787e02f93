"""Model family Wan2.1 and DC-Gen-Wan2.1 (text-to-video and image-to-video in the DC-AE-V latent space)."""
