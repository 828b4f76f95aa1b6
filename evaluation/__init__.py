"""The application: interpolation of thick scans (with per-scan adaptation), its report and the demo.

The top layer: it imports the models (AutoEncoder/, ddpm/), the data (dataset/) and the plumbing
(thinslice/); nothing imports it. The scripts beside these modules are its command lines."""
