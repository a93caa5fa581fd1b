# One image for every part: `mesh sidecar`, `mesh lb`, `mesh db`.
# Build stage: a virtualenv with mesh and its wheels. The final stage copies only that.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY registry ./registry
COPY sidecar ./sidecar
COPY lb ./lb
RUN python -m venv /opt/mesh \
 && /opt/mesh/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/mesh/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/mesh /opt/mesh
COPY examples /examples
RUN useradd --system --uid 10001 --no-create-home mesh
USER mesh
ENV PATH=/opt/mesh/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 8080 9901 53/udp 53/tcp
ENTRYPOINT ["mesh"]
CMD ["--help"]
