module gb6/bench/gen

go 1.22
