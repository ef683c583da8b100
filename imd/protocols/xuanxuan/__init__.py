"""The xuanxuan 1.0 protocol: JSON lines over TCP (--xuanxuan) and its HTTP side (getconfig,
file upload and download) on the web port."""
