# ainode, for docker-compose.yml. DCMTK is not needed to run the node, only for its tests.
FROM python:3.11-slim
WORKDIR /opt/ainode
COPY pyproject.toml README.md ./
COPY scp scp
COPY analysis analysis
COPY storage storage
COPY conf conf
RUN pip install --no-cache-dir .
EXPOSE 11112 8080
CMD ["ainode", "serve"]
