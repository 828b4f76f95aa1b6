# GPU image for the cluster (kub_files/): CUDA + PyTorch base, the project installed, a non-root user.
#   docker build -t registry.example.com/thinslice:0.1.0 . && docker push registry.example.com/thinslice:0.1.0
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1
WORKDIR /app

# Dependencies first (cached layer); torch and torchvision come with the base image.
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt

COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 thinslice \
    && chown -R thinslice:thinslice /app
USER thinslice

# Jobs pass their own command (kub_files/); by default show what the image can run.
CMD ["python", "evaluation/interpolate.py", "--help"]
