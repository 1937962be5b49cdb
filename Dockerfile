# ainode, for docker-compose.yml. DCMTK is not needed to run the node, only for its tests.
FROM python:3.11-slim
WORKDIR /opt/ainode
COPY pyproject.toml README.md ./
COPY scp scp
COPY analysis analysis
COPY storage storage
COPY conf conf
# Installed as a user installs it (not editable), and checked: every package must be in the wheel.
RUN pip install --no-cache-dir . && cd / && ainode --version && python -c "import analysis.vision.client"
EXPOSE 11112 8080
CMD ["ainode", "serve"]
