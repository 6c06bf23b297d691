module github.com/moat-dev/moat/go/moat

go 1.19
