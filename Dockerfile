# One image for every part: `mesh sidecar`, `mesh lb`, `mesh db`.
# Build stage: the Rust toolchain compiles the native core into mesh's wheel, which goes into a
# virtualenv with its dependencies. The final stage copies only that virtualenv: no toolchain.
FROM python:3.11-slim AS build
ARG RUST_VERSION=1.95.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs -o /tmp/rustup.sh \
 && sh /tmp/rustup.sh -y --profile minimal --default-toolchain "$RUST_VERSION"
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY native ./native
COPY mesh_native ./mesh_native
COPY mesh ./mesh
COPY registry ./registry
COPY sidecar ./sidecar
COPY lb ./lb
RUN python -m venv /opt/mesh \
 && /opt/mesh/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/mesh/bin/pip install --no-cache-dir . \
 && /opt/mesh/bin/python -c "import mesh_native"

FROM python:3.11-slim
COPY --from=build /opt/mesh /opt/mesh
COPY examples /examples
RUN useradd --system --uid 10001 --no-create-home mesh
USER mesh
ENV PATH=/opt/mesh/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 8080 9901 53/udp 53/tcp
ENTRYPOINT ["mesh"]
CMD ["--help"]
