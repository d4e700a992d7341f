# The node agent's image, as charts/warren runs it: the static nodeagent
# binary at /usr/local/bin/nodeagent. BPF objects are embedded in the binary.
#   docker build -t ghcr.io/warren-mesh/warren:dev .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/nodeagent ./cmd/nodeagent

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/nodeagent /usr/local/bin/nodeagent
ENTRYPOINT ["/usr/local/bin/nodeagent"]
